"""Per-channel input statistics (mean, std) of the data sets, defined once.

Every model owns its normalisation (its `mean` / `std` arguments); configs, the converters and
the PyTorch twins all take these values from here.
"""
# CIFAR-100 / CIFAR-10: the values of RepDistiller's and IRKD's data loaders.
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
# scikit-learn's digits, upsampled and repeated over RGB (computed over the train split).
DIGITS_MEAN, DIGITS_STD = (0.3061,) * 3, (0.3240,) * 3
# ImageNet (torchvision / timm; Hugging Face DeiT checkpoints).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

BY_NAME = {
    'cifar100': (CIFAR100_MEAN, CIFAR100_STD),
    'cifar10': (CIFAR10_MEAN, CIFAR10_STD),
    'digits': (DIGITS_MEAN, DIGITS_STD),
    'imagenet': (IMAGENET_MEAN, IMAGENET_STD),
}
