"""etcdgw: a fast, compatible local TCP gateway for etcd."""

from ._version import __version__

__all__ = ["__version__"]
