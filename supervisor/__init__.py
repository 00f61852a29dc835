"""homelabarr-supervisor: the one place where a HomelabARR installation touches Docker."""

__version__ = "0.1.0"
