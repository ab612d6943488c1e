#!/usr/bin/env python3
"""The Python grpcio client of the public API (stubs generated from
proto/spear/v1 at test time with grpc_tools.protoc into the build dir)
against a real router + worker: unary, stream, tokenize, list models and
an error code. Skips (77) when SmolLM2 is not cached."""
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import cluster  # noqa: E402

MODEL = cluster.smollm2_path()
if MODEL is None:
    print("SKIP: SmolLM2 not in the model cache")
    sys.exit(77)
cluster.gen_stubs()
import grpc  # noqa: E402
from spear_health import health_pb2, health_pb2_grpc  # noqa: E402  (grpc.health.v1, generated into the build dir)
from spear.v1 import generation_pb2 as pb  # noqa: E402
from spear.v1 import generation_pb2_grpc as pbg  # noqa: E402


class PythonClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.worker = cluster.start_worker(MODEL, "py-worker")
        cls.router = cluster.start_router(MODEL, [cls.worker])
        cls.channel = grpc.insecure_channel(cls.router.address)
        cls.stub = pbg.GenerationStub(cls.channel)
        cluster.wait_healthy(pbg, cls.channel, 1)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        assert cls.router.stop() == 0
        cls.worker.stop()

    def request(self, max_tokens=12):
        r = pb.GenerateRequest(prompt="What is the capital of France?", chat=True,
                               slo_class=pb.SLO_CLASS_STANDARD, request_id="py-1")
        r.sampling.max_tokens = max_tokens
        return r

    def test_unary(self):
        r = self.stub.Generate(self.request(), timeout=120)
        self.assertEqual(r.request_id, "py-1")
        self.assertTrue(r.text)
        self.assertGreater(r.usage.prompt_tokens, 0)
        self.assertEqual(r.usage.completion_tokens, len(r.token_ids))
        self.assertIn(r.finish_reason, (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH))
        self.assertGreater(r.timings.ttft_seconds, 0)
        self.assertEqual(r.worker, "py-worker")

    def test_stream(self):
        chunks = list(self.stub.GenerateStream(self.request(), timeout=120))
        self.assertGreater(len(chunks), 1)
        self.assertEqual("".join(c.text for c in chunks), self.stub.Generate(self.request(), timeout=120).text)
        self.assertNotEqual(chunks[-1].finish_reason, pb.FINISH_REASON_UNSPECIFIED)

    def test_tokenize(self):
        r = self.stub.Tokenize(pb.TokenizeRequest(text="Hello world"), timeout=10)
        self.assertGreater(len(r.ids), 0)
        self.assertEqual(len(r.ids), len(r.pieces))

    def test_list_models(self):
        r = self.stub.ListModels(pb.ListModelsRequest(), timeout=10)
        self.assertEqual(len(r.models), 1)
        m = r.models[0]
        self.assertEqual(m.vocab_size, 49152)
        self.assertEqual(m.healthy_workers, 1)
        self.assertEqual(m.architecture, "llama")

    def test_error_code(self):
        r = self.request()
        r.sampling.top_p = 2.0
        with self.assertRaises(grpc.RpcError) as e:
            self.stub.Generate(r, timeout=10)
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("top_p", e.exception.details())

    def test_health(self):
        r = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        self.assertEqual(r.status, health_pb2.HealthCheckResponse.SERVING)


if __name__ == "__main__":
    unittest.main(verbosity=2)
