"""prac: post-training pruning of large language models with reconstruction correction.

The library is organised as pure tensor functions (``masks``, ``stats``, ``correction``,
``sparsegpt``) and a thin layer that wires them to Hugging Face models (``blocks``,
``pipeline``). The ``prac.cli`` package is the only place that parses arguments.
"""

__version__ = "0.1.0"
