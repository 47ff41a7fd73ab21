"""VLMo tasks: data building, losses, inference and evaluation; each function takes the model as an argument.

    pretrain.py    the three stages of VLMo §3.4 (BEiT MIM, text-only MLM, ITC + ITM + MLM on pairs)
    retrieval.py   dual-encoder retrieval, ITM reranking, fusion scoring of every pair (§3.5, §4.4)
    vqa.py         VQA as classification over the world's answers, answers + heat maps for the app (§4.3)
    nlvr2.py       statements about image pairs: two fusion passes + a classifier (§4.3)
    image_only.py  the vision path alone: the object of every grid cell (§4.5)
    anatomy.py     one stage-3 step walked by hand (§3.1-3.3, equal to vl_losses) and a probe of the patch tokens
    ablations.py   Tables 3, 5 and 6 at equal budgets: stagewise vs scratch, Multiway vs standard / no VL, hard negatives
"""
