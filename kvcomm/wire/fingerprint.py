"""The wire checks a message's fingerprint with the models' one check (:mod:`kvcomm.models.fingerprint`)."""

from kvcomm.models.fingerprint import check_fingerprint

__all__ = ["check_fingerprint"]
