"""Both DALI GPU graphs, the training views and the evaluation view, defined and serialised on a
machine without CUDA: every operator and argument is checked against DALI's own schemas."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.augment import three_view_graph
from pipeline.augment_config import AugmentConfig
from pipeline.eval_view import eval_graph


def _source(info):
    return [np.zeros(4, dtype=np.uint8)], np.zeros((1, 1), dtype=np.int64)


@pytest.mark.parametrize("half", [False, True])
def test_the_training_graph_for_the_gpu_serialises(half: bool) -> None:
    pipe = three_view_graph(_source, ("image", "aug1", "aug2"), AugmentConfig(image_size=64), batch_size=2, num_threads=1,
                            device="gpu", device_id=None, half=half, hw_decoder_load=0.95)  # fmt: skip
    text = pipe.serialize()
    assert b"decoders__Image" in text and b"mixed" in text
    assert b"jpeg_fancy_upsampling" in text and b"hw_decoder_load" in text
    for op in (b"RandomResizedCrop", b"ColorTwist", b"GaussianBlur", b"CropMirrorNormalize"):
        assert op in text, op


def test_the_evaluation_graph_for_the_gpu_serialises() -> None:
    pipe = eval_graph(lambda fn: fn.external_source(source=_source, num_outputs=2, batch=True, batch_info=True),
                      AugmentConfig(image_size=64), 2, 1, "gpu", None)  # fmt: skip
    text = pipe.serialize()
    assert b"mixed" in text and b"jpeg_fancy_upsampling" in text and b"Resize" in text


def test_an_argument_dali_does_not_know_is_refused_without_cuda() -> None:
    from nvidia.dali import fn, pipeline_def

    @pipeline_def
    def graph():
        return fn.decoders.image(fn.external_source(name="j"), device="mixed", hw_decoder_laod=0.9)

    with pytest.raises(Exception, match="hw_decoder_laod"):
        graph(batch_size=1, num_threads=1, device_id=None).serialize()
