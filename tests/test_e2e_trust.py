"""End to end on the real SGLang server: after /update_weights_from_disk the tiers never
serve KV computed with the old weights; the revisit is computed with the new weights,
exactly as a fresh server on them computes it."""

import pytest

from lmcache_sgl.models import make_model
from lmcache_sgl.server import SGLangServer

from test_e2e_server import CHUNK, LOADED, PROMPT, config_file, prompts, same_output, server

MODEL_CHANGED = "lmcache-sgl: the weights changed"


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two `tiny` models, same architecture, other weights (seed)."""
    root = tmp_path_factory.mktemp("models")
    return make_model(root / "old", "tiny", seed=0), make_model(root / "new", "tiny", seed=1)


def test_update_weights_from_disk_moves_the_tiers_to_the_new_weights(two_models, tmp_path):
    old, new = two_models
    (a,) = prompts(1, seed=3)
    with server(old, config_file(tmp_path), tmp_path, "updated") as srv:
        srv.wait_healthy()
        srv.generate(a, max_new_tokens=8)
        srv.flush_cache()  # empties the device tree; the tiers keep the prompt
        from_tiers = srv.generate(a, max_new_tokens=8)
        assert LOADED in srv.log_path.read_text(), "the tiers did not hold the prompt before the update"
        assert from_tiers["meta_info"]["cached_tokens"] >= PROMPT // CHUNK * CHUNK
        srv.flush_cache()

        reply = srv.request("/update_weights_from_disk", {"model_path": str(new)})
        assert reply["success"], reply
        after = srv.generate(a, max_new_tokens=8)
        log = srv.log_path.read_text()
    assert after["meta_info"]["cached_tokens"] == 0, "KV of the old weights was served"
    assert log.count(LOADED) == 1
    assert MODEL_CHANGED in log

    with SGLangServer(new, extra_args=["--log-level", "info"], log_path=tmp_path / "fresh.log") as srv:
        srv.wait_healthy()
        fresh = srv.generate(a, max_new_tokens=8)
    assert same_output(fresh, after)
    assert not same_output(from_tiers, after), "the two models' outputs do not differ: the test cannot tell them apart"
