"""Model files. Importing this package registers every model and its presets with mmkit.config."""

from mmkit.models import m6  # noqa: E402,F401  (registers "m6" and the m6-tiny / m6-base / m6-10b presets)
from mmkit.models import vqgan  # noqa: E402,F401  (registers "vqgan", the vqgan-world-tiny preset and the vqgan-world recipe)
from mmkit.models import m6_pretrain  # noqa: E402,F401  (M6 §3.3 multitask pretraining; registers the "m6-tiny-pretrained" recipe)
from mmkit.models import m6_downstream  # noqa: E402,F401  (M6 §4.3-4.6 downstream; registers "m6_itm" and the "m6-tiny-itm" recipe)
from mmkit.models import m6_vqa  # noqa: E402,F401  (M6 §4.2 generative VQA; registers the "m6-tiny-vqa" recipe and VQA models)
from mmkit.models import m6_moe  # noqa: E402,F401  (M6 §3.4 M6-MoE; registers "m6_moe", the m6-tiny-moe / m6-100b presets, ffn_type "moe")
from mmkit.models import m6_t2i  # noqa: E402,F401  (M6 §4.1 text-to-image code LM; registers "m6-t2i" and the "m6-tiny-t2i" recipe)
