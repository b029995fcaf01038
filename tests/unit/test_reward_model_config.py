"""The reward-model term's configuration errors (RL loop and RFT) and how a response is closed
for scoring; the scores themselves are checked in tests/distributed/test_rl.py."""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_keye.config import config_to_dict, load_config
from megatron_keye.config.loading import ConfigError
from megatron_keye.data.text.tokenizer import DEFAULT_TOKENIZER_DIR, KeyeTokenizer
from megatron_keye.post_training.reward_model import closed_response, reward_model_config
from megatron_keye.post_training.rft import RFTOptions
from megatron_keye.post_training.rl_config import check_rl_config

POLICY = ("stage.loss_head=gspo", "rl.prompts=prompts.jsonl", "schedule.train_iters=4",
          "rl.minibatches=2")


def _policy(*extra: str):
    return load_config(None, [*POLICY, *extra])


def _saved_reward_model(*extra: str) -> dict:
    return config_to_dict(load_config(None, ["model.output_head=value", "stage.loss_head=reward",
                                             "model.num_layers=2", *extra]))


def test_model_term_needs_rl_reward_model():
    with pytest.raises(ConfigError) as err:
        check_rl_config(_policy("rl.reward_terms=[exact,model]", "rl.reward_weights=[1.0,0.5]"))
    assert err.value.field == "rl.reward_model"
    check_rl_config(_policy("rl.reward_terms=[exact,model]", "rl.reward_weights=[1.0,0.5]",
                            "rl.reward_model=runs/rm"))


def test_reward_model_without_a_model_term_and_unknown_terms_are_refused():
    with pytest.raises(ConfigError) as err:
        check_rl_config(_policy("rl.reward_model=runs/rm"))
    assert err.value.field == "rl.reward_terms" and "rl.reward_model" in str(err.value)
    with pytest.raises(ConfigError, match="modle"):
        check_rl_config(_policy("rl.reward_terms=[modle]", "rl.reward_model=runs/rm"))


def _config(saved: dict, policy=None, tokenizer=None):
    policy = policy or _policy()
    return reward_model_config(saved, checkpoint="runs/rm", field="rl.reward_model",
                               policy_model=config_to_dict(policy)["model"],
                               tokenizer=tokenizer or KeyeTokenizer.default(), tensor=2,
                               pipeline=2, precision="fp32")


def test_reward_model_config_comes_from_the_checkpoint_on_our_layout():
    config = _config(_saved_reward_model("model.vision=null", "precision=bf16"))
    assert config.model.output_head == "value" and config.model.num_layers == 2
    assert config.model.vision is None  # its own architecture: no vision tower
    assert (config.parallel.tensor, config.parallel.pipeline) == (2, 2)
    assert config.precision == "fp32"


def test_a_checkpoint_that_is_not_a_value_model_is_refused_by_name():
    saved = config_to_dict(load_config(None, []))  # a language model
    with pytest.raises(ConfigError) as err:
        _config(saved)
    assert err.value.field == "rl.reward_model"
    assert "runs/rm" in str(err.value) and "output_head" in str(err.value)


def test_another_vocabulary_is_refused():
    with pytest.raises(ConfigError, match="vocab_size"):
        _config(_saved_reward_model("model.vocab_size=4096"))
    with pytest.raises(ConfigError, match="image_token_id"):
        _config(_saved_reward_model(), policy=_policy("model.image_token_id=7"))


def test_another_tokenizer_is_refused(tmp_path):
    other = tmp_path / "other"
    shutil.copytree(DEFAULT_TOKENIZER_DIR, other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]  # swap two ordinary tokens' ids
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="tokenizer"):
        _config(_saved_reward_model(f"data.tokenizer={other}"))
    same = tmp_path / "same"
    shutil.copytree(DEFAULT_TOKENIZER_DIR, same)
    _config(_saved_reward_model(f"data.tokenizer={same}"))  # a copy of ours is fine


def test_closed_response_ends_like_a_training_sample():
    eos, pad, image = 5, 6, 9
    close = dict(eos_id=eos, stop_ids=(eos, pad), vision_pads=(image,))
    assert closed_response([1, 2, eos], **close) == [1, 2, eos]
    assert closed_response([1, 2, pad], **close) == [1, 2, eos]
    assert closed_response([1, 2], **close) == [1, 2, eos]  # cut at the length limit
    assert closed_response([1, image, 3], **close) == [1, eos]
    assert closed_response([], **close) == [eos]


def test_rft_reward_model_options_are_checked():
    base = dict(checkpoint="c", prompts="p", out="o")
    with pytest.raises(ValueError, match="--reward-model"):
        RFTOptions(**base, reward_terms=["model"], reward_weights=[1.0])
    with pytest.raises(ValueError, match="--replace-reference"):
        RFTOptions(**base, replace_reference=True)
    RFTOptions(**base, reward_terms=["exact", "model"], reward_weights=[1.0, 0.5],
               reward_model="rm", replace_reference=True)
