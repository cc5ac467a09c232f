"""The KV cache's keyword follows what the callee declares, else the installed transformers."""

from __future__ import annotations

from shoal.hf_compat import cache_field, cache_keyword, cache_of


def test_cache_keyword_follows_the_signature_and_falls_back_to_the_installed_name():
    def new_style(input_ids, cache=None):  # type: ignore[no-untyped-def]
        return None

    def old_style(input_ids, past_key_values=None):  # type: ignore[no-untyped-def]
        return None

    def wrapper(input_ids=None, **kwargs):  # type: ignore[no-untyped-def]
        return None

    assert cache_keyword(new_style) == "cache"
    assert cache_keyword(old_style) == "past_key_values"
    assert cache_keyword(wrapper) == cache_field() in ("cache", "past_key_values")


def test_cache_of_reads_either_name():
    marker = object()
    assert cache_of({"cache": marker}) is marker
    assert cache_of({"past_key_values": marker}) is marker
    assert cache_of({"logits": 1}) is None
