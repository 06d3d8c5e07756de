"""AdaLFL: online loss function learning. `AdaptiveLoss` is the component for any training loop."""

from adalfl.adaptive_loss import AdaptiveLoss

__all__ = ["AdaptiveLoss"]
