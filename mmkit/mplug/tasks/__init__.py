"""mPLUG's tasks: what each one trains on, its loss, inference and evaluation (the model lives in mmkit.mplug.model).

    inputs.py      text-encoder / decoder inputs from strings (shared by the tasks)
    pretrain.py    ITC with momentum queues, ITM with hard negatives, MLM, PrefixLM, optimised jointly (§3.3)
    vqa.py         VQA as open-vocabulary answer generation, confidence, alternatives, heat maps (§5.2.1)
    captioning.py  captioning with beam search, BLEU-4 / CIDEr, self-critical sequence training (§5.2.2)
    retrieval.py   ITC top-k candidates reranked by ITM, R@1/5/10 both ways (§5.2.3)
    grounding.py   boxes as coordinate tokens written by the decoder, Acc@IoU 0.5 (§5.2.4)
    classify.py    SNLI-VE and NLVR2 heads on the fused [CLS] (§5.2.5)
    video.py       zero-shot "video": frame features concatenated into one sequence (§5.4.2)
    efficiency.py  forward time of the fusion variants (Fig. 1 / 4) and strides (Fig. 3), §4 switches (Table 6)
    anatomy.py     the box opened: a VQA batch walked through the model's pieces (§3.1-3.2 eq. (1)-(5)), attention
                   maps, the loss equal to vqa_loss; a probe of the ViT's patch tokens (notebook 08)
"""
