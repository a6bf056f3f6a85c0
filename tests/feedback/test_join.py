"""Feedback joins: parsing (all or nothing), live quality through the real app, unknown ids."""

from __future__ import annotations

import asyncio
from typing import Any

import modelgen
import numpy as np
import pytest
from conftest import Agent, MakeAgent
from feedback.kit import CLASSES, breast_cancer_data, breast_cancer_files, infer_doc, output

from agent.app import FEEDBACK, OUTBOX
from agent.errors import BadRequest
from agent.feedback.join import Feedback, canonical_label, join, parse_feedback
from agent.feedback.predlog import Prediction


async def predict(agent: Agent, model: str, request_id: str, rows: np.ndarray) -> dict[str, Any]:
    """One prediction with a chosen id; the decoded response."""
    name = "float_input" if model == "breast_cancer" else "x"
    status, body = await agent.infer_json(model, infer_doc(request_id, rows, name))
    assert status == 200, body
    assert body["id"] == request_id
    return body


async def feedback(agent: Agent, doc: object) -> tuple[int, dict[str, Any]]:
    """POST /v1/feedback; status and decoded body."""
    async with agent.client.post(agent.url + "/v1/feedback", json=doc) as resp:
        return resp.status, await resp.json()


async def quality(agent: Agent, model: str) -> dict[str, Any]:
    """The live quality of a model's version 1 since start, from GET /v1/models/{model}."""
    async with agent.client.get(agent.url + "/v1/models/" + model) as resp:
        assert resp.status == 200
        report: dict[str, Any] = (await resp.json())["quality"]
    return report["1"]["total"]


class TestParse:
    def test_single_and_list_forms(self) -> None:
        """One {"id", "label"} and {"feedback": [...]} both parse, labels and values alike."""
        assert parse_feedback({"id": "a", "label": 1}) == [Feedback("a", label=1)]
        many = parse_feedback({"feedback": [{"id": "a", "label": "cat"}, {"id": "b", "value": 2}]})
        assert many == [Feedback("a", label="cat"), Feedback("b", value=2)]

    @pytest.mark.parametrize(
        "bad",
        [
            {"label": 1},
            {"id": "", "label": 1},
            {"id": "b"},
            {"id": "b", "label": 1, "value": 2.0},
            {"id": "b", "label": 1.5},
            {"id": "b", "label": True},
            {"id": "b", "value": "high"},
            {"id": "b", "value": float("nan")},
            {"id": "b", "value": []},
            "b",
        ],
    )
    def test_a_bad_record_names_its_index(self, bad: object) -> None:
        """The error names the first bad record by index and says nothing was accepted."""
        with pytest.raises(BadRequest, match=r"feedback\[1\].*nothing was accepted"):
            parse_feedback({"feedback": [{"id": "a", "label": 0}, bad]})

    def test_an_empty_list_is_refused(self) -> None:
        """An empty feedback list is a 400, not a silent no-op."""
        with pytest.raises(BadRequest, match="non-empty list"):
            parse_feedback({"feedback": []})


class TestJoinPure:
    def prediction(self, label: int) -> Prediction:
        outputs = {"label": np.array([label], dtype=np.int64)}
        return Prediction("p", "m", 1, 100.0, outputs, None)

    def test_index_and_name_are_the_same_class(self) -> None:
        """A label by index and by manifest name both become the class name."""
        preds = {"p": self.prediction(1)}
        names = {"m": CLASSES}
        by_index, _ = join([Feedback("p", label=1)], preds, names, 110.0)
        by_name, _ = join([Feedback("p", label="benign")], preds, names, 110.0)
        assert by_index[0].truth == by_name[0].truth == by_index[0].predicted == ["benign"]
        assert by_index[0].delay_s == pytest.approx(10.0)

    def test_unnamed_indices_stay_numbers(self) -> None:
        """Without class names, an index stays an int (it still compares with the prediction)."""
        assert canonical_label(3, ()) == 3
        assert canonical_label(3, CLASSES) == 3
        assert canonical_label("cat", CLASSES) == "cat"

    def test_unknown_ids_are_listed(self) -> None:
        """An id with no logged prediction is returned as unknown, not raised."""
        joined, unknown = join([Feedback("nope", label=0)], {}, {}, 1.0)
        assert joined == []
        assert unknown == ["nope"]


class TestClassification:
    async def test_accuracy_and_per_class_counts(self, make_agent: MakeAgent) -> None:
        """Accuracy and per-class counts from feedback equal those computed from the answers."""
        agent = await make_agent(breast_cancer_files())
        rows, labels = breast_cancer_data()
        predicted = []
        for i in range(40):
            body = await predict(agent, "breast_cancer", f"c{i}", rows[i : i + 1])
            predicted.append(output(body, "label")[0])
        records = [{"id": f"c{i}", "label": int(labels[i])} for i in range(40)]
        status, answer = await feedback(agent, {"feedback": records})
        assert (status, answer["accepted"], answer["unknown"]) == (200, 40, 0)
        report = await quality(agent, "breast_cancer")
        truth = labels[:40]
        assert report["labelled"] == 40
        assert report["accuracy"] == pytest.approx(float(np.mean(np.array(predicted) == truth)))
        for k, name in enumerate(CLASSES):
            mine = truth == k
            expected = {
                "count": int(mine.sum()),
                "correct": int((np.array(predicted)[mine] == k).sum()),
            }
            assert report["per_class"][name] == expected

    async def test_label_by_index_and_by_name_compare_equal(self, make_agent: MakeAgent) -> None:
        """Feedback by index and by class name for the same answer both count as correct."""
        agent = await make_agent(breast_cancer_files())
        rows, _ = breast_cancer_data()
        first = await predict(agent, "breast_cancer", "by-index", rows[:1])
        await predict(agent, "breast_cancer", "by-name", rows[:1])
        k = output(first, "label")[0]
        status, _ = await feedback(
            agent,
            {"feedback": [{"id": "by-index", "label": k}, {"id": "by-name", "label": CLASSES[k]}]},
        )
        assert status == 200
        report = await quality(agent, "breast_cancer")
        assert report["accuracy"] == 1.0
        assert report["per_class"] == {CLASSES[k]: {"count": 2, "correct": 2}}

    async def test_shipped_label_and_prediction_share_one_form(self, make_agent: MakeAgent) -> None:
        """The queued record carries the class name on both sides, whatever form was sent."""
        agent = await make_agent(breast_cancer_files())
        rows, _ = breast_cancer_data()
        body = await predict(agent, "breast_cancer", "shape", rows[:1])
        k = output(body, "label")[0]
        await feedback(agent, {"id": "shape", "label": k})
        batch = await agent.app[OUTBOX].lease_batch(100, 1_000_000)
        assert batch is not None
        (record,) = [r for r in batch.records if r["kind"] == "feedback"]
        assert record["label"] == record["predicted"] == CLASSES[k]
        assert record["outputs"]["label"] == [k]
        assert (record["model"], record["version"], record["id"]) == ("breast_cancer", 1, "shape")

    async def test_a_multi_row_prediction_takes_a_label_per_row(
        self, make_agent: MakeAgent
    ) -> None:
        """A 3-row request joined with a list of 3 labels counts 3 outcomes."""
        agent = await make_agent(breast_cancer_files())
        rows, _ = breast_cancer_data()
        body = await predict(agent, "breast_cancer", "three", rows[:3])
        got = output(body, "label")
        wrong = 1 - got[2]
        status, answer = await feedback(agent, {"id": "three", "label": [*got[:2], wrong]})
        assert (status, answer["accepted"]) == (200, 1)
        report = await quality(agent, "breast_cancer")
        assert report["labelled"] == 3
        assert report["accuracy"] == pytest.approx(2 / 3)


class TestRegression:
    async def test_mae_and_rmse(self, make_agent: MakeAgent) -> None:
        """MAE and RMSE from value feedback equal those of the model's answers (y = 2x + 1)."""
        agent = await make_agent({"reg.onnx": modelgen.affine_model(2.0, 1.0, features=1)})
        xs = [0.5, 1.0, -2.0, 3.0, 10.0]
        truth = [2.5, 2.0, -3.5, 7.0, 20.0]
        for i, x in enumerate(xs):
            await predict(agent, "reg", f"r{i}", np.array([[x]], dtype=np.float32))
        records = [{"id": f"r{i}", "value": t} for i, t in enumerate(truth)]
        status, answer = await feedback(agent, {"feedback": records})
        assert (status, answer["accepted"]) == (200, 5)
        err = np.array(truth) - (2 * np.array(xs) + 1)
        report = await quality(agent, "reg")
        assert report["regression"] == 5
        assert report["mae"] == pytest.approx(float(np.abs(err).mean()))
        assert report["rmse"] == pytest.approx(float(np.sqrt((err**2).mean())))


class TestUnknown:
    async def test_unknown_and_expired_ids_are_counted_not_errors(
        self, make_agent: MakeAgent
    ) -> None:
        """Ids never seen and ids past the TTL are counted and listed; the rest is accepted."""
        agent = await make_agent(breast_cancer_files(), {"feedback": {"ttl_s": 0.3}})
        rows, _ = breast_cancer_data()
        await predict(agent, "breast_cancer", "old", rows[:1])
        loop = agent.app[FEEDBACK]
        await loop.predlog.flush()
        expired_at = loop.predlog.settings.ttl_s
        # Wait (bounded) until the first prediction is older than the TTL; not a timing check.
        for _ in range(100):
            if (await loop.predlog.lookup(["old"])) == {}:
                break
            await asyncio.sleep(expired_at / 5)
        await predict(agent, "breast_cancer", "new", rows[1:2])
        doc = {"feedback": [{"id": i, "label": 0} for i in ("old", "new", "never")]}
        status, answer = await feedback(agent, doc)
        assert status == 200
        assert (answer["accepted"], answer["unknown"]) == (1, 2)
        assert sorted(answer["unknown_ids"]) == ["never", "old"]
        async with agent.client.get(agent.url + "/metrics") as resp:
            text = await resp.text()
        assert 'edge_agent_feedback_records{outcome="unknown"} 2.0' in text
        assert 'edge_agent_feedback_records{outcome="accepted"} 1.0' in text

    async def test_only_unknown_ids_is_still_a_200(self, make_agent: MakeAgent) -> None:
        """A request whose ids are all unknown answers 200 with accepted 0 and queues nothing."""
        agent = await make_agent(breast_cancer_files())
        status, answer = await feedback(agent, {"feedback": [{"id": "x", "label": 0}]})
        assert (status, answer["accepted"], answer["unknown"]) == (200, 0, 1)
        assert agent.app[OUTBOX].stats().records["feedback"] == 0


class TestMalformed:
    async def test_a_malformed_record_rejects_the_whole_request(
        self, make_agent: MakeAgent
    ) -> None:
        """A bad record is a 400 naming its index, and its valid neighbours are not accepted."""
        agent = await make_agent(breast_cancer_files())
        rows, _ = breast_cancer_data()
        await predict(agent, "breast_cancer", "ok", rows[:1])
        doc = {"feedback": [{"id": "ok", "label": 0}, {"id": "ok", "label": 0}, {"id": "ok"}]}
        status, answer = await feedback(agent, doc)
        assert status == 400
        assert "feedback[2]" in answer["error"]
        assert "nothing was accepted" in answer["error"]
        assert agent.app[OUTBOX].stats().records["feedback"] == 0
        assert agent.app[FEEDBACK].accepted == 0
        async with agent.client.get(agent.url + "/v1/models/breast_cancer") as resp:
            assert (await resp.json())["quality"] == {}

    async def test_a_body_that_is_not_json_is_a_400(self, make_agent: MakeAgent) -> None:
        """An undecodable body is a 400 that says to send JSON."""
        agent = await make_agent(breast_cancer_files())
        async with agent.client.post(agent.url + "/v1/feedback", data=b"{nope") as resp:
            assert resp.status == 400
            assert "JSON" in (await resp.json())["error"]
