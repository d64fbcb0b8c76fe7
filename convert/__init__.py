"""Weight conversion between tikd-jax (Flax) checkpoints and PyTorch.

  python -m convert.to_torch --workdir DIR [--step N] --out FILE.pt|FILE.safetensors
  python -m convert.from_torch --checkpoint FILE|HF_FOLDER [--model resnet32x4] --out DIR

`convert.mapping` holds the key/layout rules (pure functions), `convert.torch_models` the PyTorch
twins of our models (timm's DeiT layout, RepDistiller's CIFAR ResNet) that load the exported
state dicts with strict=True. torch is needed here; timm is not.
"""
