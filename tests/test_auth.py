"""TLS, mutual TLS, tokens and roles on a real server, with certificates made here."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgescope.bundle import Bundle
from edgescope.errors import ConfigError
from edgescope.kserve.v2 import inference_pb2 as kserve_pb2
from edgescope.runtime.client.stream import StreamOptions, stream_source
from edgescope.runtime.server import auth
from edgescope.runtime.server.auth import METHOD_ROLES, TokenTable, role_for
from edgescope.runtime.server.security import SecurityConfig
from edgescope.runtime.sources.synthetic import SyntheticUltrasoundSource
from edgescope.runtime.transport import ClientSecurity, check_exposure, client_credentials, sync_channel
from edgescope.v1 import stream_pb2, stream_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc

from .certs import CertificateAuthority
from .conftest import ServerThread

READ_TOKEN = "read-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(folder)
    other = CertificateAuthority(folder / "other", name="another CA")
    server = ca.issue("edgescope-server", server=True)
    client = ca.issue("probe-7", server=False)
    stranger = other.issue("stranger", server=False)
    return {
        "ca": ca.path,
        "other_ca": other.path,
        "server_cert": server.cert,
        "server_key": server.key,
        "client_cert": client.cert,
        "client_key": client.key,
        "stranger_cert": stranger.cert,
        "stranger_key": stranger.key,
    }


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# role token\nread {READ_TOKEN}\nadmin {ADMIN_TOKEN}\n")
    return path


@pytest.fixture(scope="module")
def mtls_server(example_bundle: Bundle, pki: dict[str, Path], token_file: Path) -> Iterator[ServerThread]:
    """TLS with client certificates and tokens; LoadModel finds bundles beside the example."""
    security = SecurityConfig(
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_client_ca=pki["ca"],
        token_file=token_file,
        model_repository=example_bundle.path.parent,
    )
    running = ServerThread([example_bundle.path], security=security)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def token_server(example_bundle: Bundle, token_file: Path) -> Iterator[ServerThread]:
    """Plain text on loopback with tokens: the client sends them over gRPC's local credentials."""
    security = SecurityConfig(token_file=token_file, model_repository=example_bundle.path.parent)
    running = ServerThread([example_bundle.path], security=security)
    try:
        yield running
    finally:
        running.stop()


def _client(pki: dict[str, Path], token: str | None = READ_TOKEN, cert: str = "client") -> ClientSecurity:
    return ClientSecurity(tls_ca=pki["ca"], tls_cert=pki[f"{cert}_cert"], tls_key=pki[f"{cert}_key"], token=token)


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failure:
        call()  # type: ignore[operator]
    code: grpc.StatusCode = failure.value.code()
    return code


# -- TLS and mutual TLS ------------------------------------------------------------------------


def test_mutual_tls_with_a_token_serves_the_api(mtls_server: ServerThread, pki: dict[str, Path]) -> None:
    with sync_channel(mtls_server.target, _client(pki)) as channel:
        response = stream_pb2_grpc.StreamServiceStub(channel).ListModels(stream_pb2.ListModelsRequest(), timeout=20)
    assert [m.name for m in response.models] == ["lesion-unet"]


def test_streaming_client_works_over_mutual_tls(mtls_server: ServerThread, pki: dict[str, Path]) -> None:
    options = StreamOptions(
        target=mtls_server.target, model="lesion-unet", realtime=False, timeout_s=60, security=_client(pki)
    )
    report = asyncio.run(stream_source(SyntheticUltrasoundSource(seed=2, n_frames=4), options))
    assert report.sent == 4 and report.latency.errors == 0


@pytest.mark.parametrize(
    ("security", "why"),
    [
        ("plain", "a plain-text client cannot talk to a TLS port"),
        ("no-client-cert", "mutual TLS refuses a client without a certificate"),
        ("stranger", "a client certificate from another CA is refused"),
        ("wrong-ca", "the client refuses a server its CA did not sign"),
    ],
)
def test_tls_handshake_refusals(mtls_server: ServerThread, pki: dict[str, Path], security: str, why: str) -> None:
    client = {
        "plain": ClientSecurity(token=READ_TOKEN),
        "no-client-cert": ClientSecurity(tls_ca=pki["ca"], token=READ_TOKEN),
        "stranger": _client(pki, cert="stranger"),
        "wrong-ca": ClientSecurity(
            tls_ca=pki["other_ca"], tls_cert=pki["client_cert"], tls_key=pki["client_key"], token=READ_TOKEN
        ),
    }[security]
    with sync_channel(mtls_server.target, client) as channel:
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        code = _code(lambda: stub.ListModels(stream_pb2.ListModelsRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE, why


def test_health_is_public_even_under_tokens(mtls_server: ServerThread, pki: dict[str, Path]) -> None:
    with sync_channel(mtls_server.target, _client(pki, token=None)) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        assert _code(lambda: stub.ListModels(stream_pb2.ListModelsRequest(), timeout=10)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )


# -- tokens and roles --------------------------------------------------------------------------


def _calls(channel: grpc.Channel) -> dict[str, object]:
    """One call per guarded service, each a closure that raises RpcError or returns."""
    stream = stream_pb2_grpc.StreamServiceStub(channel)
    telemetry = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    infer = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelMetadata",
        request_serializer=kserve_pb2.ModelMetadataRequest.SerializeToString,
        response_deserializer=kserve_pb2.ModelMetadataResponse.FromString,
    )
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    pixels = np.full((32, 32), 90, dtype=np.uint8)
    frame = stream_pb2.Frame(
        model="lesion-unet",
        raw=stream_pb2.RawImage(width=32, height=32, channels=1, dtype=4, format=1, data=pixels.tobytes()),
    )
    return {
        "ListModels": lambda: stream.ListModels(stream_pb2.ListModelsRequest(), timeout=20),
        "GetModel": lambda: stream.GetModel(stream_pb2.GetModelRequest(name="lesion-unet"), timeout=20),
        "Infer": lambda: stream.Infer(frame, timeout=30),
        "Stream": lambda: list(stream.Stream(iter([frame]), timeout=30)),
        "Telemetry": lambda: next(iter(telemetry.Telemetry(telemetry_pb2.TelemetryRequest(), timeout=20))),
        "KServe ModelMetadata": lambda: infer(kserve_pb2.ModelMetadataRequest(name="lesion-unet"), timeout=20),
        "reflection": lambda: list(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=20
            )
        ),
        "UnloadModel": lambda: stream.UnloadModel(stream_pb2.UnloadModelRequest(name="no-such-model"), timeout=20),
        "LoadModel": lambda: stream.LoadModel(stream_pb2.LoadModelRequest(bundle="no-such-bundle"), timeout=20),
    }


READ_CALLS = ("ListModels", "GetModel", "Infer", "Stream", "Telemetry", "KServe ModelMetadata", "reflection")
ADMIN_CALLS = ("UnloadModel", "LoadModel")


@pytest.mark.parametrize("token", [None, "not-a-valid-token-at-all", READ_TOKEN[:-1]])
def test_missing_or_wrong_token_is_unauthenticated_everywhere(token_server: ServerThread, token: str | None) -> None:
    with sync_channel(token_server.target, ClientSecurity(token=token)) as channel:
        for name, call in _calls(channel).items():
            assert _code(call) == grpc.StatusCode.UNAUTHENTICATED, name


def test_read_token_reads_and_may_not_administer(token_server: ServerThread) -> None:
    with sync_channel(token_server.target, ClientSecurity(token=READ_TOKEN)) as channel:
        calls = _calls(channel)
        for name in READ_CALLS:
            calls[name]()  # type: ignore[operator]
        for name in ADMIN_CALLS:
            assert _code(calls[name]) == grpc.StatusCode.PERMISSION_DENIED, name


def test_admin_token_reaches_the_admin_calls(token_server: ServerThread, example_bundle: Bundle) -> None:
    with sync_channel(token_server.target, ClientSecurity(token=ADMIN_TOKEN)) as channel:
        calls = _calls(channel)
        calls["ListModels"]()  # type: ignore[operator]  # admin implies read
        # Past the guard: the calls themselves answer (nothing of that name exists).
        assert _code(calls["UnloadModel"]) == grpc.StatusCode.NOT_FOUND
        assert _code(calls["LoadModel"]) == grpc.StatusCode.NOT_FOUND
        stub = stream_pb2_grpc.StreamServiceStub(channel)
        loaded = stub.LoadModel(stream_pb2.LoadModelRequest(bundle=example_bundle.path.name, name="copy"), timeout=60)
        assert loaded.name == "copy"
        stub.UnloadModel(stream_pb2.UnloadModelRequest(name="copy"), timeout=30)


def test_mutual_tls_caller_is_named_by_its_certificate(mtls_server: ServerThread, pki: dict[str, Path]) -> None:
    seen: list[str] = []
    original = auth.Authenticator.caller

    def spy(self: auth.Authenticator, context: grpc.aio.ServicerContext) -> auth.Caller:  # type: ignore[type-arg]
        caller = original(self, context)
        seen.append(caller.identity)
        return caller

    auth.Authenticator.caller = spy  # type: ignore[method-assign]
    try:
        with sync_channel(mtls_server.target, _client(pki)) as channel:
            stream_pb2_grpc.StreamServiceStub(channel).ListModels(stream_pb2.ListModelsRequest(), timeout=20)
    finally:
        auth.Authenticator.caller = original  # type: ignore[method-assign]
    assert seen and seen[-1].startswith("cert:probe-7/token:")


def test_every_served_method_has_a_role(token_server: ServerThread) -> None:
    """A new call must be classified here, or it needs admin (fail closed): nothing is open by accident."""
    with sync_channel(token_server.target, ClientSecurity(token=READ_TOKEN)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=20))
    services = [s.name for s in answer.list_services_response.service]
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    methods = []
    for service in services:
        try:
            descriptor = pool.FindServiceByName(service)
        except KeyError:
            continue
        methods += [f"/{service}/{m.name}" for m in descriptor.methods]
    methods += [f"/inference.GRPCInferenceService/{name}" for name in ("ModelInfer", "ModelStreamInfer")]
    assert len(methods) > 15
    unlisted = [m for m in methods if m not in METHOD_ROLES]
    assert not unlisted, f"methods without a role: {unlisted}"
    assert role_for("/edgescope.v1.StreamService/SomethingNew") == "admin"


# -- the rules for tokens and exposure ---------------------------------------------------------


def test_token_table_rules(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"read {READ_TOKEN}\nadmin {ADMIN_TOKEN}\n")
    table = TokenTable.load(path, environ={"EDGESCOPE_READ_TOKEN": "env-read-token-0123456789"})
    assert table.role_of(READ_TOKEN) == "read"
    assert table.role_of(ADMIN_TOKEN) == "admin"
    assert table.role_of("env-read-token-0123456789") == "read"
    assert table.role_of(ADMIN_TOKEN + "x") is None and table.role_of("") is None
    for text, reason in [
        ("reader abcdefghijklmnopqrstuvwxyz", "neither"),
        ("read short", "at least 16"),
        ("read", "ROLE TOKEN"),
    ]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=reason):
            TokenTable.load(path, environ={})


@pytest.mark.parametrize(
    ("host", "tls", "authenticated", "insecure", "refused"),
    [
        ("127.0.0.1", False, False, False, None),
        ("::1", False, True, False, None),
        ("localhost", False, False, False, None),
        ("0.0.0.0", False, False, False, "needs TLS"),
        ("0.0.0.0", True, False, False, "needs authentication"),
        ("0.0.0.0", True, True, False, None),
        ("0.0.0.0", False, False, True, None),
        ("10.1.2.3", False, True, True, "plain text"),
    ],
)
def test_exposure_rules(host: str, tls: bool, authenticated: bool, insecure: bool, refused: str | None) -> None:
    if refused is None:
        check_exposure(host, tls=tls, authenticated=authenticated, insecure=insecure, what="gRPC")
    else:
        with pytest.raises(ConfigError, match=refused):
            check_exposure(host, tls=tls, authenticated=authenticated, insecure=insecure, what="gRPC")


def test_client_refuses_plain_text_off_loopback_and_tokens_in_the_clear() -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        client_credentials("10.0.0.5:8731", ClientSecurity())
    assert client_credentials("10.0.0.5:8731", ClientSecurity(insecure=True)) is None
    with pytest.raises(ConfigError, match="not sent in plain text"):
        client_credentials("10.0.0.5:8731", ClientSecurity(insecure=True, token=READ_TOKEN))
    assert client_credentials("[::1]:8731", ClientSecurity(token=READ_TOKEN)) is not None


def test_cli_clients_refuse_plain_text_to_a_remote_server(capsys: pytest.CaptureFixture[str]) -> None:
    from edgescope.cli import main

    assert main(["models", "--target", "10.255.255.1:8731"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert (
        main(["top", "--target", "10.255.255.1:8731", "--count", "1", "--insecure", "--token-file", "/nonexistent"])
        == 2
    )
    assert "token file" in capsys.readouterr().err


def test_cli_models_lists_over_tls_with_a_token(
    mtls_server: ServerThread, pki: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgescope.cli import main

    token = tmp_path / "token"
    token.write_text(READ_TOKEN + "\n")
    tls = ["--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client_cert"]), "--tls-key", str(pki["client_key"])]
    assert main(["models", "--target", mtls_server.target, *tls, "--token-file", str(token)]) == 0
    assert capsys.readouterr().out.startswith("lesion-unet\t")
    assert main(["models", "--target", mtls_server.target, *tls]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_perf_measures_a_server_over_mutual_tls_with_a_token(mtls_server: ServerThread, pki: dict[str, Path]) -> None:
    from edgescope.runtime.client.perf import PerfOptions, run_perf

    options = PerfOptions(
        target=mtls_server.target,
        model="lesion-unet",
        warmup_s=0.2,
        window_s=0.5,
        max_windows=3,
        security=_client(pki),
    )
    (step,) = asyncio.run(run_perf(options))
    assert step.requests > 0 and step.errors == 0
