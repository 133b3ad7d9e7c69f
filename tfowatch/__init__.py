"""tfowatch: watch TCP Fast Open and TIME-WAIT reuse in the Linux kernel."""

__version__ = "0.1.0"
