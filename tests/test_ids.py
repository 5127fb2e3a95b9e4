from prefsynth.warehouse import ids


def test_canonical_json_ignores_key_order_and_whitespace():
    a = {"b": 1, "a": [1, {"y": "é", "x": None}]}
    b = {"a": [1, {"x": None, "y": "é"}], "b": 1}
    assert ids.canonical_json(a) == ids.canonical_json(b) == '{"a":[1,{"x":null,"y":"é"}],"b":1}'


def test_ids_are_stable_hex_and_namespaced():
    msgs = [{"role": "user", "content": "hi"}]
    pid = ids.prompt_id(msgs)
    assert pid == ids.prompt_id([{"content": "hi", "role": "user"}])
    assert len(pid) == 32 and int(pid, 16) >= 0
    # the same payload under another kind gives another id
    assert ids.content_id("prompt", msgs) == pid
    assert ids.content_id("call", msgs) != pid


def test_response_id_depends_on_everything_that_produced_the_row():
    base = ids.response_id("p", "model@1", {"temperature": 1.0, "max_tokens": 8}, 0)
    assert base == ids.response_id("p", "model@1", {"max_tokens": 8, "temperature": 1.0}, 0)
    assert base != ids.response_id("p", "model@1", {"temperature": 1.0, "max_tokens": 8}, 1)
    assert base != ids.response_id("p", "model@2", {"temperature": 1.0, "max_tokens": 8}, 0)
    assert base != ids.response_id("p", "model@1", {"temperature": 0.5, "max_tokens": 8}, 0)
    assert base != ids.response_id("q", "model@1", {"temperature": 1.0, "max_tokens": 8}, 0)


def test_call_id_includes_seed_and_model_identity():
    body = {"messages": [{"role": "user", "content": "x"}], "seed": 1}
    assert ids.call_id("m", body) != ids.call_id("m", {**body, "seed": 2})
    assert ids.call_id("m", body) != ids.call_id("n", body)


def test_pair_and_score_ids():
    rule = {"rule": "best_vs_worst", "min_margin": 1.0, "scorer_id": "s"}
    assert ids.pair_id("a", "b", rule, (2, 1)) != ids.pair_id("b", "a", rule, (2, 1))
    assert ids.pair_id("a", "b", rule, (2, 1)) != ids.pair_id("a", "b", {**rule, "min_margin": 2.0}, (2, 1))
    assert ids.pair_id("a", "b", rule, (1.0, 0.0)) != ids.pair_id("a", "b", rule, (0.75, 0.0))  # values moved
    assert ids.pair_id("a", "b", rule, (1.0, 0.0)) == ids.pair_id("a", "b", rule, (1.0 + 1e-12, 0.0))
    assert ids.score_id("r", "s1") != ids.score_id("r", "s2")
