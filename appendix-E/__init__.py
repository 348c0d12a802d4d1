"""Appendix E: parameter-efficient fine-tuning with LoRA.

`appendix_e.lora` holds the low-rank adapter (`LoRALayer`), the wrapper that adds it to a
linear layer (`LinearWithLoRA`), `replace_linear_with_lora` to wrap every linear layer of a
model (`replace_target_linears_with_lora`: only the ones named), freezing and counting helpers, and `merge_lora` to fold the adapters back into plain
`nn.Linear` layers. The classifier it fine-tunes comes from chapter 6.
"""

from appendix_e.lora import (
    LORA_TARGETS,
    LinearWithLoRA,
    LoRALayer,
    add_lora,
    count_trainable_parameters,
    freeze_parameters,
    lora_parameters,
    merge_lora,
    parse_lora_targets,
    replace_linear_with_lora,
    replace_target_linears_with_lora,
)

__all__ = ["LORA_TARGETS", "LinearWithLoRA", "LoRALayer", "add_lora", "count_trainable_parameters", "freeze_parameters",
           "lora_parameters", "merge_lora", "parse_lora_targets",
           "replace_linear_with_lora", "replace_target_linears_with_lora"]
