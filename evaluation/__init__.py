"""Evaluation of image-text encoders, as SLIP reports it: zero-shot classification, a linear
probe on frozen image features, and image-text retrieval.

A library over an encoder (`evaluation.encoder.Encoder`: `encode_image`, `encode_text`) and
the pipeline's evaluation view; it knows nothing of the trainer's model class or of DeepSpeed.

    from evaluation.zeroshot import eval_zeroshot
    from evaluation.linear_probe import eval_linear
    from evaluation.retrieval import eval_retrieval
"""
