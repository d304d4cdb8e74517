"""p2pshare: peer-to-peer, end-to-end encrypted emergency transfer of DICOM studies."""

__version__ = "0.1.0"
