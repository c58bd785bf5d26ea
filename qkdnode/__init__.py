"""qkdnode: the control daemon of a QKD link's transmitter or receiver box."""

__version__ = "0.1.0"
