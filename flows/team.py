"""`gptpipe team-setup`: what a Prefect server needs once before workers on several machines share runs.

Work pools `cpu` and `gpu` (process workers, each inside a checkout of this repository), and the result storage
block the deployments in infra/prefect.yaml name: a flow run's result and persisted state then live in the shared
store (S3), where a parent run on one machine reads what its stage subflow returned on another. And the wait for a
stage handed to another pool, which fails when that pool has no worker to take it.
"""

import asyncio
import time

import boto3
from botocore.exceptions import ClientError
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import FlowRun, WorkPoolStatus
from prefect.exceptions import ObjectAlreadyExists
from prefect.filesystems import RemoteFileSystem
from prefect.states import Cancelled

from components.errors import InputError

WORK_POOLS = ("cpu", "gpu")
RESULTS_BLOCK = "gptpipe-results"  # infra/prefect.yaml: PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK
POLL_SECONDS = 2.0


async def _create_work_pools() -> list[str]:
    created = []
    async with get_client() as client:
        for name in WORK_POOLS:
            try:
                await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                created.append(name)
            except ObjectAlreadyExists:
                pass
    return created


def _ensure_bucket(uri: str) -> str | None:
    """Create the bucket of an s3:// URI when it does not exist yet (a fresh MinIO of the compose stack)."""
    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    s3 = boto3.client("s3")
    try:
        s3.head_bucket(Bucket=bucket)
        return None
    except ClientError as error:
        if error.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
            raise InputError(f"team-setup --results {uri}: cannot reach bucket {bucket} "
                             f"({error.response['Error']['Code']}); check the AWS credentials") from None
    s3.create_bucket(Bucket=bucket)
    return bucket


def team_setup(results: str) -> list[str]:
    """Create the work pools (if missing) and point the results block at `results` (an s3:// prefix, or a folder
    for workers on one machine). Returns what it did, one line each."""
    if "://" in results and not results.startswith(("s3://", "file://")):
        raise InputError(f"team-setup --results {results}: give s3://bucket/prefix (or a folder when every worker "
                         "runs on this machine)")
    lines = []
    if results.startswith("s3://") and (bucket := _ensure_bucket(results)):
        lines.append(f"bucket {bucket} created")
    created = asyncio.run(_create_work_pools())
    RemoteFileSystem(basepath=results.rstrip("/")).save(RESULTS_BLOCK, overwrite=True)
    return lines + [f"work pools created: {', '.join(created) or 'none, all there'} (of {', '.join(WORK_POOLS)})",
                    f"flow results and persisted state: {results} (block remote-file-system/{RESULTS_BLOCK})"]


def wait_for_handed_run(run: FlowRun, what: str, worker_timeout_s: float) -> FlowRun:
    """Wait for a flow run handed to a work pool to end. Prefect would let it wait to be taken for ever; while it
    waits, the pool must have a worker online (a busy one is fine: the run queues), else after `worker_timeout_s`
    the run is cancelled, so a worker started later does not take a stale run, and this fails naming the pool."""
    with get_client(sync_client=True) as client:
        attended = time.monotonic()
        while not (run := client.read_flow_run(run.id)).state.is_final():
            pool = client.read_work_pool(run.work_pool_name) if run.state.is_scheduled() else None
            if pool is None or pool.status == WorkPoolStatus.READY:
                attended = time.monotonic()
            elif time.monotonic() - attended > worker_timeout_s:
                message = (f"{what}: work pool `{pool.name}` had no worker online for {worker_timeout_s:g} s "
                           f"(team.worker_timeout_s; pool {pool.status.value}); start one with `GPTPIPE_CHECKOUT=$PWD "
                           f"prefect worker start --pool {pool.name}` (step 3 of the README's team set-up)")
                client.set_flow_run_state(run.id, Cancelled(message=message), force=True)
                raise RuntimeError(message)
            time.sleep(POLL_SECONDS)
    return run
