"""Losses written once and shared by M6, VLMo and mPLUG: tensors in -> (loss, metrics).

* ``lm``  token cross-entropy (MLM, PrefixLM, captioning) and sequence log-probabilities (scoring candidates)
* ``itc`` image-text contrastive InfoNCE with a learned temperature, negatives gathered across processes,
  the momentum feature queue and momentum distillation (VLMo §3.3, mPLUG §3.3 / ALBEF)
* ``itm`` image-text matching and global hard-negative mining from the ITC similarities (VLMo §3.3)
* ``mlm`` BERT masked language modelling: whole-word masking, the 80/10/10 rule (VLMo §3.3, mPLUG §3.3)

These modules import only torch and each other, never model or system code.
"""
from mmkit.objectives.itc import (FeatureQueue, ITCOutput, QueueConfig, Temperature, TemperatureConfig,
                                  all_gather_no_grad, all_gather_with_grad, itc_loss, itc_loss_with_queue,
                                  momentum_copy, momentum_update, positive_targets, world_info)
from mmkit.objectives.itm import HardNegatives, itm_labels, itm_loss, sample_hard_negatives
from mmkit.objectives.lm import IGNORE_INDEX, sequence_logprob, split_prefix, token_cross_entropy, token_log_probs
from mmkit.objectives.mlm import MLMOutput, mlm_loss, mlm_mask, word_ids_from_tokens

__all__ = [
    # lm
    "IGNORE_INDEX", "token_cross_entropy", "sequence_logprob", "token_log_probs", "split_prefix",
    # mlm
    "MLMOutput", "word_ids_from_tokens", "mlm_mask", "mlm_loss",
    # itc
    "Temperature", "TemperatureConfig", "ITCOutput", "itc_loss", "positive_targets",
    "QueueConfig", "FeatureQueue", "itc_loss_with_queue", "momentum_update", "momentum_copy",
    "all_gather_with_grad", "all_gather_no_grad", "world_info",
    # itm
    "HardNegatives", "sample_hard_negatives", "itm_loss", "itm_labels",
]
