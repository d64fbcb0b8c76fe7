"""The documentation: a README that fits on a screen, its set-up commands the ones CI runs, and
every relative link in README.md, docs/*.md and benchmarks/README.md pointing at a file (and, for
`file.md#anchor`, at a heading) that exists."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
MAX_README_LINES = 250
LINK = re.compile(r'(?<!!)\[[^\]]*\]\(([^)\s]+)\)')  # [text](target), not images


def _docs() -> list[str]:
  others = [os.path.join(ROOT, d, 'README.md') for d in ('benchmarks', 'tests')]
  return [README] + others + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def _no_code_blocks(text: str) -> str:
  return re.sub(r'^(```|~~~).*?^\1', '', text, flags=re.M | re.S)


def _prose(text: str) -> str:
  """The text without code blocks and inline code, where brackets are not links."""
  return re.sub(r'`[^`\n]*`', '', _no_code_blocks(text))


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  heading = re.sub(r'[`*]', '', heading.strip()).lower()
  return re.sub(r'[^\w\- ]', '', heading).replace(' ', '-')


def _anchors(path: str) -> set[str]:
  seen: dict[str, int] = {}
  out = set()
  for line in _no_code_blocks(open(path, encoding='utf-8').read()).splitlines():
    m = re.match(r'#{1,6}\s+(.*?)\s*#*\s*$', line)
    if m:
      slug = _slug(m.group(1))
      n = seen.get(slug, 0)
      seen[slug] = n + 1
      out.add(slug if n == 0 else f'{slug}-{n}')
  return out


def broken_links(path: str) -> list[str]:
  """Every relative link of the markdown file `path` whose file or heading does not exist."""
  broken = []
  for target in LINK.findall(_prose(open(path, encoding='utf-8').read())):
    if re.match(r'[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto:
      continue
    file, _, anchor = target.partition('#')
    resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
    where = f'{os.path.relpath(path, ROOT)}: ({target})'
    if not os.path.exists(resolved):
      broken.append(f'{where} -> {os.path.relpath(resolved, ROOT)} does not exist')
    elif anchor and resolved.endswith('.md') and anchor not in _anchors(resolved):
      broken.append(f'{where} -> no heading #{anchor} in {os.path.relpath(resolved, ROOT)}')
  return broken


def test_the_readme_fits_on_a_screen():
  lines = len(open(README, encoding='utf-8').read().splitlines())
  assert lines <= MAX_README_LINES, (f'README.md has {lines} lines, more than {MAX_README_LINES}: '
                                     'move the depth to a file under docs/ and link it')


def test_every_relative_link_resolves():
  docs = _docs()
  assert len(docs) > 3, docs
  broken = [b for path in docs for b in broken_links(path)]
  assert not broken, 'broken links:\n' + '\n'.join(broken)


def test_a_broken_link_is_reported(tmp_path):
  (tmp_path / 'there.md').write_text('# A heading\n')
  page = tmp_path / 'page.md'
  page.write_text('[ok](there.md) [ok](there.md#a-heading) [web](https://example.com)\n'
                  '`[code](nowhere.md)`\n```\n[code](nowhere.md)\n```\n'
                  '[missing](nowhere.md) [no heading](there.md#another)\n')
  broken = broken_links(str(page))
  assert len(broken) == 2 and 'nowhere.md does not exist' in broken[0], broken
  assert 'no heading #another' in broken[1], broken


def test_every_docs_page_is_linked_from_the_readme():
  readme = open(README, encoding='utf-8').read()
  unlinked = [
      os.path.relpath(p, ROOT)
      for p in sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
      if f'({os.path.relpath(p, ROOT)})' not in readme
  ]
  assert not unlinked, f'docs pages the README does not link: {unlinked}'


def test_the_readme_test_command_is_the_one_ci_runs():
  """.ci/run runs the README's test command (in its own virtual environment): the pytest part of
  the two is the same, byte for byte."""
  ci = open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8').read()
  ci_command = ci.split('# ---', 1)[1].split('\n', 1)[1].split('\n# ---', 1)[0].strip()
  pytest_part = ci_command.rsplit('&& ', 1)[1]
  assert pytest_part.startswith('python -m pytest'), ci_command
  readme = open(README, encoding='utf-8').read()
  blocks = re.findall(r'^```bash\n(.*?)^```', readme, flags=re.M | re.S)
  commands = [b.strip() for b in blocks[:2]]
  assert len(commands) == 2 and all('\n' not in c for c in commands), commands
  assert commands[1].endswith('&& ' + pytest_part), (commands[1], pytest_part)
  assert 'pip install' in commands[1] and 'requirements.txt' in commands[1]
  assert 'main.py --config=configs/demo.py' in commands[0] and 'requirements.txt' in commands[0]
