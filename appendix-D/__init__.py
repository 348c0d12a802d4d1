"""Appendix D: bells and whistles for the training loop.

`appendix_d.training` holds the learning-rate schedule (`lr_at_step`: linear warm-up, then
cosine decay), gradient-norm helpers and `train_model`, chapter 5's loop extended with the
schedule and gradient clipping. The loss and sampling helpers are imported from
`ch05.gpt_train`.
"""

from appendix_d.training import find_highest_gradient, lr_at_step, total_grad_norm, train_model

__all__ = ["find_highest_gradient", "lr_at_step", "total_grad_norm", "train_model"]
