__path__ = __import__("pkgutil").extend_path(__path__, __name__)
"""higher: differentiate through whole PyTorch training loops.

Example:
    >>> import higher
    >>> higher.__version__
    '0.3.0'
"""

from higher.patch import HigherError as HigherError
from higher.patch import monkeypatch as monkeypatch

__version__ = "0.3.0"

__all__ = ["HigherError", "monkeypatch", "__version__"]
