"""M6's tasks: what each one trains on, its loss, inference and evaluation (the model lives in mmkit.m6.model).

    pretrain.py    the four M6 §3.3 pretraining tasks mixed, stage 0, the val evaluator
    vqa.py         generative VQA with the "question ... answer:" pattern (§4.2)
    itm.py         image-text matching with substituted-caption negatives (§4.6)
    captioning.py  captioning with greedy / beam / sampling (§4.3)
    text_qa.py     question answering with long answers on text (§4.4)
    poems.py       poems under format constraints (§4.5)
    seq2seq.py     text-to-text fine-tuning shared by text_qa and poems
    t2i.py         text-to-image: the code LM on VQGAN codes, sampling, reranking, faithfulness (§4.1)
    moe.py         M6-MoE routing statistics, capacity and training on the world (§3.4)
"""
