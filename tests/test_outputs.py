"""outputs.py: predict.py's claim on its output folder (predictions.json), the refusals that keep masks of two
checkpoints or settings apart, and the parts of an array job."""

import json
import types

import pytest

import outputs


def record(sha="a" * 64, threshold=0.5, tta=True, postprocess=False):
    return {"checkpoints": [{"path": "runs/x/best.pt", "sha256": sha}], "image_size": 96, "threshold": threshold,
            "tta": tta, "postprocess": postprocess}


def test_a_folder_is_claimed_once_and_then_recognised(tmp_path):
    outputs.claim_output(tmp_path, record(), overwrite=False)
    assert json.loads((tmp_path / outputs.RECORD).read_text()) == record()
    outputs.claim_output(tmp_path, record(), overwrite=False)  # the same run again (a requeue, another part)
    assert sorted(p.name for p in tmp_path.iterdir()) == [outputs.RECORD]  # no draft left behind


@pytest.mark.parametrize("other, named", [(record(sha="b" * 64), "another checkpoint"),
                                          (record(threshold=0.4), "--threshold 0.5 (here 0.4)"),
                                          (record(tta=False), "--tta True (here False)"),
                                          (record(postprocess=True), "--postprocess False (here True)")])
def test_masks_of_another_checkpoint_or_setting_are_never_mixed_in(tmp_path, other, named):
    outputs.claim_output(tmp_path, record(), overwrite=False)
    with pytest.raises(outputs.OutputError, match="pass --overwrite") as err:
        outputs.claim_output(tmp_path, other, overwrite=False)
    assert named in str(err.value)
    outputs.claim_output(tmp_path, other, overwrite=True)  # --overwrite takes the folder over
    assert json.loads((tmp_path / outputs.RECORD).read_text()) == other


def test_masks_without_a_record_are_refused_and_an_unreadable_record_named(tmp_path):
    (tmp_path / "ISIC_0000000_segmentation.png").write_bytes(b"png")
    with pytest.raises(outputs.OutputError, match="holds 1 masks .* but no predictions.json"):
        outputs.claim_output(tmp_path, record(), overwrite=False)
    assert not (tmp_path / outputs.RECORD).exists()
    (tmp_path / outputs.RECORD).write_text("{half")
    with pytest.raises(outputs.OutputError, match="cannot read .*predictions.json"):
        outputs.claim_output(tmp_path, record(), overwrite=False)


def test_parts_cover_every_item_once_in_nearly_equal_slices():
    items = list(range(10))
    parts = [outputs.part_of(items, 4, part) for part in range(1, 5)]
    assert sum(parts, []) == items and {len(p) for p in parts} <= {2, 3}
    with pytest.raises(outputs.OutputError, match="--parts 11 is more than the 10 images"):
        outputs.part_of(items, 11, 1)


def test_each_image_gets_its_mask_and_the_extra_files_asked_for(tmp_path):
    item = types.SimpleNamespace(id="ISIC_0000001")
    config = types.SimpleNamespace(save_probabilities=True, overlay=False)
    assert outputs.output_paths(item, tmp_path, config) == [tmp_path / "ISIC_0000001_segmentation.png",
                                                             tmp_path / "probabilities" / "ISIC_0000001_probability.png"]
