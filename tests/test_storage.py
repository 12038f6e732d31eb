"""Where a run's files go, and who writes them: path resolution, the shared-storage
decision, the restore broadcast's packing and token discovery (pure
functions, no Ray)."""
import os

import pytest
import torch

from ray_fedat.auth import split_address, token_source, use_token_if_available
from ray_fedat.checkpoints import pack_restore_state, unpack_restore_state
from ray_fedat.config import parse_config, resume_config
from ray_fedat.errors import ConfigError
from ray_fedat.models import build_model
from ray_fedat.storage import (RankStorage, StorageError, default_output_dir, is_uri, plan_storage, sees_marker,
                               storage_rank, write_marker)

S3 = "s3://bucket/runs?endpoint_override=127.0.0.1:8333&scheme=http"


def test_relative_paths_are_resolved_on_the_driver_and_uris_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.npz").write_bytes(b"")
    cfg = parse_config(["--dataset", "npz", "--data-file", "d.npz", "--data-dir", "data", "--storage-path", "out",
                        "--output-dir", "~/mine"])
    assert cfg.data_file == str(tmp_path / "d.npz") and cfg.data_dir == str(tmp_path / "data")
    assert cfg.storage_path == str(tmp_path / "out")
    assert cfg.output_dir == os.path.join(os.path.expanduser("~"), "mine")
    cfg = parse_config(["--storage-path", S3])
    assert cfg.storage_path == S3  # handed to Ray unchanged: no local directory named "s3:"
    assert cfg.data_dir == str(tmp_path / "data")


def test_a_file_uri_is_a_local_path_and_gets_the_shared_disk_check(tmp_path):
    cfg = parse_config(["--storage-path", f"file://{tmp_path}/my%20runs"])
    assert cfg.storage_path == str(tmp_path / "my runs") and not is_uri(f"file://{tmp_path}")
    assert default_output_dir(f"file://{tmp_path}", "r1") == str(tmp_path / "r1")
    # a node that does not see the driver's disk: only the driver's node may write checkpoints
    plan = plan_storage(f"file://{tmp_path}", {"a": True, "b": False}, "a", driver_can_host=True)
    assert not plan.shared and plan.pin_driver_node


def test_output_dir_defaults_beside_local_checkpoints_and_to_runs_for_a_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_output_dir(str(tmp_path / "st"), "r1") == str(tmp_path / "st" / "r1")
    assert default_output_dir(S3, "r1") == str(tmp_path / "runs" / "r1")
    assert is_uri(S3) and is_uri("gs://b/p") and not is_uri("/data/runs") and not is_uri("runs?x=a://b")
    with pytest.raises(ConfigError, match="must be a local directory"):
        parse_config(["--output-dir", "s3://bucket/out"])


def test_resume_keeps_a_uri_storage_and_takes_the_output_dir_from_the_run_dir(tmp_path):
    import json

    saved = parse_config(["--storage-path", S3, "--name", "r", "--output-dir", str(tmp_path / "r")]).to_dict()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.json").write_text(json.dumps({"config": saved}))
    cfg = resume_config(str(tmp_path / "r"), {"rounds": 4})
    assert (cfg.storage_path, cfg.name, cfg.output_dir, cfg.rounds) == (S3, "r", str(tmp_path / "r"), 4)


SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzSECRET"  # an AWS-like secret: "/" and "+" in it


@pytest.mark.parametrize("uri", [
    f"s3://AKIAKEYID:{SECRET}@bucket/runs?endpoint_override=127.0.0.1:8333&scheme=http",
    f"s3://AKIAKEYID:{SECRET}@bucket/runs",
    f"s3://{SECRET}@bucket/runs",  # pyarrow takes a bare userinfo as the access key
    f"gs://user:{SECRET}@bucket/runs",
    f"s3://bucket/runs?endpoint_override=127.0.0.1:8333&secret_key={SECRET}",
])
def test_a_storage_uri_with_credentials_is_refused_in_one_line_without_them(uri, tmp_path, capsys):
    """Refused before anything runs (the URI would be copied into summary.json, the console and
    Ray Train's state export), by parse_config, --print-config, a RunConfig built in code and a
    resumed run's saved config alike, and no message repeats the secret."""
    import json

    from ray_fedat.run_config import RunConfig
    from ray_fedat.storage import check_store_answers, has_credentials
    from ray_fedat.train import main

    assert has_credentials(uri)
    with pytest.raises(ConfigError) as e:
        parse_config(["--storage-path", uri])
    message = str(e.value)
    assert "credentials in a storage URI are refused" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert "~/.aws" in message and "\n" not in message
    assert SECRET not in message and "AKIAKEYID" not in message
    with pytest.raises(SystemExit) as e:
        main(["--storage-path", uri, "--print-config"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and len(err.splitlines()) == 1 and SECRET not in err
    with pytest.raises(ConfigError) as e:
        RunConfig(storage_path=uri).resolved().validate()
    assert SECRET not in str(e.value)
    with pytest.raises(StorageError) as e:
        check_store_answers(uri)  # train.run's first step, for a RunConfig that skipped validate()
    assert "credentials in a storage URI are refused" in str(e.value) and SECRET not in str(e.value)
    (tmp_path / "summary.json").write_text(json.dumps({"config": {**parse_config([]).to_dict(), "storage_path": uri}}))
    with pytest.raises(ConfigError) as e:
        parse_config(["--resume", str(tmp_path)])
    assert SECRET not in str(e.value)


def test_no_error_message_repeats_a_uri_credential(tmp_path, capsys):
    """Every one-line error (configuration, storage, argparse, the sweep) strips a URI's
    user:secret@ part, wherever the URI sits in the message."""
    from ray_fedat import sweep
    from ray_fedat.errors import redact_secrets

    uri = f"s3://AKIAKEYID:{SECRET}@bucket/runs"
    assert redact_secrets(f"--storage-path {uri}?endpoint_override=h:1: x") == \
        "--storage-path s3://***@bucket/runs?endpoint_override=h:1: x"
    assert redact_secrets("ray://me:pw@head:10001 and 'gs://u:p@b/x'") == "ray://***@head:10001 and 'gs://***@b/x'"
    assert redact_secrets("s3://b/p?region=r&secret_key=S&session_token=T") == \
        "s3://b/p?region=r&secret_key=***&session_token=***"
    assert redact_secrets(S3) == S3 and redact_secrets("mail me@example.com") == "mail me@example.com"
    for error in (ConfigError(f"--output-dir {uri} must be a local directory"), StorageError(f"{uri}: no")):
        assert SECRET not in str(error) and "s3://***@bucket/runs" in str(error)
    with pytest.raises(ConfigError) as e:
        parse_config(["--output-dir", uri])
    assert "must be a local directory" in str(e.value) and SECRET not in str(e.value)
    with pytest.raises(SystemExit):  # a mistyped flag: argparse quotes its value
        parse_config(["--storage-pth", uri])
    assert SECRET not in capsys.readouterr().err
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"storage_path: '{uri}'\nrounds: 1\n")
    with pytest.raises(SystemExit) as e:
        sweep.main([str(grid), "--dry-run"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "storage_path s3://***@bucket/runs" in err and SECRET not in out + err


def test_an_at_sign_in_a_uri_path_is_refused_with_how_to_write_it():
    with pytest.raises(ConfigError, match="write it as %40"):
        parse_config(["--storage-path", "s3://bucket/v@2/runs"])
    assert parse_config(["--storage-path", "s3://bucket/v%402/runs"]).storage_path == "s3://bucket/v%402/runs"


def test_worker_nodes_needs_one_node_per_worker():
    assert parse_config(["--workers", "2", "--worker-nodes", "10.0.0.1, 10.0.0.2"]).worker_node_list() == \
        ["10.0.0.1", "10.0.0.2"]
    with pytest.raises(ConfigError, match="names 1 node"):
        parse_config(["--workers", "2", "--worker-nodes", "10.0.0.1"])


def test_marker_is_seen_only_with_the_drivers_token(tmp_path):
    token = write_marker(str(tmp_path))
    assert sees_marker(str(tmp_path), token)
    assert not sees_marker(str(tmp_path), "a stale run's token")
    assert not sees_marker(str(tmp_path / "elsewhere"), token)
    assert sees_marker(None, None)  # a URI


def ranks(*flags):
    return [RankStorage(r, on_driver, sees) for r, (on_driver, sees) in enumerate(flags)]


def test_storage_rank_is_rank_0_when_shared_else_the_drivers_node():
    assert storage_rank(ranks((False, True), (True, True)), "/nfs") == 0  # shared mount
    assert storage_rank(ranks((False, False), (True, True)), "/local") == 1  # rank 0 on the other host
    assert storage_rank(ranks((True, True), (False, False), (True, True)), "/local") == 0
    with pytest.raises(StorageError, match="mounted at the same place on every node.*URI"):
        storage_rank(ranks((False, False), (False, True)), "/local")  # a stale copy is not the driver's node


def test_plan_storage_refuses_when_no_worker_can_run_on_the_drivers_node():
    shared = plan_storage("/nfs/runs", {"a": True, "b": True}, "a", driver_can_host=False)
    assert shared.shared and not shared.pin_driver_node
    assert plan_storage(S3, {"a": False, "b": False}, "a", driver_can_host=False).shared
    local = plan_storage("/runs", {"a": True, "b": False}, "a", driver_can_host=True)
    assert not local.shared and local.pin_driver_node and "1 node(s) do not see it" in local.note
    with pytest.raises(StorageError, match="cannot host a worker"):
        plan_storage("/runs", {"a": True, "b": False}, "a", driver_can_host=False)
    with pytest.raises(StorageError, match="--worker-nodes places no worker"):
        plan_storage("/runs", {"a": True, "b": False}, "a", driver_can_host=True, pinned_nodes=["b", "b"])
    pinned = plan_storage("/runs", {"a": True, "b": False}, "a", driver_can_host=True, pinned_nodes=["b", "a"])
    assert not pinned.pin_driver_node  # the user's order already includes the driver's node


def test_restore_state_round_trips_model_round_and_best_exactly():
    model = build_model("lenet", (1, 8, 8), 10)
    vec = torch.cat([v.reshape(-1).float() for v in model.state_dict().values()])
    vec[0] = 0.1234567  # not representable in a few digits: must survive bit for bit
    state = {"round": 7, "best": {"natural": {"value": 0.9123456789, "round": 6}, "robust": None}}
    out_vec, out_state = unpack_restore_state(pack_restore_state(vec, state))
    assert torch.equal(out_vec, vec) and out_vec.dtype == torch.float32
    assert out_state == state
    planned = {**state, "plan": {"eval_every": 3, "eval_s": 1.25}}  # a time-budget run's evaluation interval
    assert unpack_restore_state(pack_restore_state(vec, planned))[1] == planned


def test_a_restarted_time_budget_run_keeps_its_evaluation_interval():
    from ray_fedat.config import parse_config
    from ray_fedat.worker import RoundPlanner

    cfg = parse_config(["--time-budget", "100"])
    planner = RoundPlanner(cfg, deadline=1e12, device=torch.device("cpu"))
    assert planner.eval_every == 1 and planner.plan() == {"eval_every": 1, "eval_s": 0.0}
    planner.restore({"eval_every": 4, "eval_s": 2.5})
    assert (planner.eval_every, planner.eval_s) == (4, 2.5) and planner.plan() == {"eval_every": 4, "eval_s": 2.5}
    fixed = RoundPlanner(parse_config(["--time-budget", "100", "--eval-every", "2"]), 1e12, torch.device("cpu"))
    fixed.restore({"eval_every": 4, "eval_s": 2.5})
    assert fixed.eval_every == 2 and fixed.plan() is None  # the user's --eval-every stays


def test_token_is_found_in_the_environment_or_the_default_file(tmp_path):
    assert token_source({"RAY_AUTH_TOKEN": "abc"}) == "$RAY_AUTH_TOKEN"
    path = tmp_path / "tok"
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(path)}) is None
    path.write_text("secret")
    assert token_source({"RAY_AUTH_TOKEN_PATH": str(path)}) == str(path)
    env = {"RAY_AUTH_TOKEN_PATH": str(path)}
    assert use_token_if_available(env) == str(path) and env["RAY_AUTH_MODE"] == "token"
    env = {"RAY_AUTH_TOKEN_PATH": str(path), "RAY_AUTH_MODE": "disabled"}
    use_token_if_available(env)
    assert env["RAY_AUTH_MODE"] == "disabled"  # the user's explicit choice wins


def test_a_ray_without_token_authentication_has_no_authentication_error_to_catch(monkeypatch):
    import ray.exceptions

    from ray_fedat.auth import authentication_error

    assert authentication_error() is ray.exceptions.AuthenticationError
    monkeypatch.delattr(ray.exceptions, "AuthenticationError")  # as in Ray < 2.52
    stand_in = authentication_error()
    assert issubclass(stand_in, Exception) and not issubclass(stand_in, (OSError, RuntimeError))


def test_split_address():
    assert split_address("192.168.1.100:6379") == ("192.168.1.100", 6379)
    assert split_address("[::1]:6379") == ("::1", 6379)
    assert split_address("auto") is None and split_address("ray://head:10001") is None
