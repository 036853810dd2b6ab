"""difftune's shared library. Importing it first (every script and tool does) keeps transformers' torchvision
fallback notice to one line per process: see library/torchvision_notice.py."""
from library import torchvision_notice as _torchvision_notice

_torchvision_notice.install()
