"""trustmig: secure live migration of QEMU/KVM virtual machines."""

__version__ = "0.1.0"
