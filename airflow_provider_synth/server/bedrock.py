"""A local stand-in for Amazon Bedrock's batch inference control plane, over a real S3 API.

moto (5.2.5) models Bedrock's model customization jobs and logging settings, but not batch inference
(``CreateModelInvocationJob`` and its siblings are absent from ``moto/bedrock``): this stand-in serves those
four calls on 127.0.0.1 as botocore's ``bedrock`` service model defines them (REST-JSON, ``x-amzn-ErrorType``
errors), so the real boto3 client, the amazon provider's hooks and aiobotocore talk to it unchanged. Like the
service, it is asynchronous: a job moves Submitted -> Validating -> Scheduled -> InProgress -> Completed (or
PartiallyCompleted, Failed, Stopped, Expired) on a clock of its own, reads its input records from S3 and writes
``<input>.jsonl.out`` and ``manifest.json.out`` under ``<output>/<job id>/`` in S3, as Bedrock does.

Point an Airflow ``aws`` connection at it with ``service_config``::

    {"endpoint_url": "<moto S3>", "service_config": {"bedrock": {"endpoint_url": srv.endpoint_url}}}

Faults: throttled creates (429 ``ThrottlingException``), a create whose response is lost after the job was
created (the connection closes), records answered with an error (429, 500, 400) a given number of times, a
job that fails validation (below the minimum records) or expires, and stops.

From a shell: ``python -m airflow_provider_synth.server.bedrock --s3-endpoint-url http://127.0.0.1:5000``.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import re
import secrets
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from airflow_provider_synth.runs.bedrock_mapping import ANTHROPIC_VERSION, base_model_id

#: The statuses a job passes through before it is processed, in order.
_QUEUED = ("Submitted", "Validating", "Scheduled", "InProgress")
_TERMINAL = frozenset({"Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired"})
_JOB_NAME = re.compile(r"^[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\+\-\.]){0,63}$")
_TOKEN = re.compile(r"^[a-zA-Z0-9]{1,256}(-*[a-zA-Z0-9]){0,256}$")
_ROLE = re.compile(r"^arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+$")


@dataclass
class RecordFault:
    """Answer the records whose ``modelInput`` JSON contains ``marker`` with an error, ``times`` times each.

    :param marker: a substring of the record's ``modelInput`` JSON.
    :param code: the record's ``errorCode`` (HTTP status: 429, 500, 400...).
    :param times: how many times each such record fails (then it is answered); ``None``: always.
    """

    marker: str
    code: int = 429
    times: int | None = 1
    seen: Counter[str] = field(default_factory=Counter)


@dataclass
class Job:
    arn: str
    job_id: str
    name: str
    token: str
    model_id: str
    role_arn: str
    input_uri: str
    output_uri: str
    timeout_hours: int
    submitted: float
    status: str = "Submitted"
    message: str = ""
    modified: float = 0.0
    ended: float | None = None
    stop_requested: bool = False
    expire: bool = False

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "jobArn": self.arn, "jobName": self.name, "modelId": self.model_id, "clientRequestToken": self.token,
            "roleArn": self.role_arn, "status": self.status, "submitTime": self.submitted,
            "lastModifiedTime": self.modified or self.submitted,
            "inputDataConfig": {"s3InputDataConfig": {"s3Uri": self.input_uri, "s3InputFormat": "JSONL"}},
            "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": self.output_uri}},
            "timeoutDurationInHours": self.timeout_hours,
            "jobExpirationTime": self.submitted + self.timeout_hours * 3600,
        }
        if self.message:
            out["message"] = self.message
        if self.ended is not None:
            out["endTime"] = self.ended
        return out


class BedrockStandIn:
    """The stand-in server, its jobs and its faults, in background threads.

    :param s3_endpoint_url: the S3 API the jobs read and write (moto's server).
    :param step_s: seconds a job spends in each status before the next one.
    :param region: the region in job ARNs.
    :param account: the account in job ARNs.
    :param min_records: records a job must hold (below it, the job fails validation, as Bedrock's does).
    """

    def __init__(self, s3_endpoint_url: str, *, step_s: float = 0.2, region: str = "us-east-1",
                 account: str = "123456789012", min_records: int = 100) -> None:
        self.s3_endpoint_url = s3_endpoint_url
        self.step_s = step_s
        self.region, self.account = region, account
        self.min_records = min_records
        self.jobs: dict[str, Job] = {}
        self.counters: Counter[str] = Counter()
        #: how many times each record body (``modelInput`` as sorted JSON) was processed, over every job
        self.processed: Counter[str] = Counter()
        self.record_faults: list[RecordFault] = []
        #: the next N creates answer 429 ThrottlingException
        self.throttle_creates = 0
        #: the next N creates create the job, then close the connection without answering
        self.lose_create_responses = 0
        #: the next N jobs created expire after processing half of their records
        self.expire_jobs = 0
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    # -- life cycle -------------------------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self, host: str = "127.0.0.1", port: int = 0) -> BedrockStandIn:
        stand_in = self

        class Handler(_Handler):
            server_stand_in = stand_in

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._threads = [threading.Thread(target=self._server.serve_forever, name="bedrock-standin", daemon=True),
                         threading.Thread(target=self._advance_forever, name="bedrock-standin-jobs", daemon=True)]
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> BedrockStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _s3(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint_url, region_name=self.region,
                            aws_access_key_id="standin", aws_secret_access_key="standin")

    # -- the API ----------------------------------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], bool]:
        """``(status, response, answer)``; ``answer`` False: close the connection without a response."""
        self.counters["create_requests"] += 1
        with self._lock:
            if self.throttle_creates > 0:
                self.throttle_creates -= 1
                self.counters["throttled"] += 1
                return 429, _error("ThrottlingException", "Too many requests, please wait before trying again."), True
            problem = self._invalid(body)
            if problem:
                return 400, _error("ValidationException", problem), True
            token = body.get("clientRequestToken") or secrets.token_hex(16)
            for job in self.jobs.values():
                if job.token == token:
                    self.counters["idempotent_replays"] += 1
                    return 200, {"jobArn": job.arn}, True
            job_id = secrets.token_hex(6)
            s3in = body["inputDataConfig"]["s3InputDataConfig"]["s3Uri"]
            s3out = body["outputDataConfig"]["s3OutputDataConfig"]["s3Uri"]
            job = Job(f"arn:aws:bedrock:{self.region}:{self.account}:model-invocation-job/{job_id}", job_id,
                      body["jobName"], token, body["modelId"], body["roleArn"], s3in, s3out,
                      int(body.get("timeoutDurationInHours") or 168), time.time())
            if self.expire_jobs > 0:
                self.expire_jobs -= 1
                job.expire = True
            self.jobs[job.arn] = job
            self.counters["jobs_created"] += 1
            if self.lose_create_responses > 0:
                self.lose_create_responses -= 1
                self.counters["lost_responses"] += 1
                return 200, {}, False
            return 200, {"jobArn": job.arn}, True

    def _invalid(self, body: dict[str, Any]) -> str:
        for key in ("jobName", "roleArn", "modelId", "inputDataConfig", "outputDataConfig"):
            if not body.get(key):
                return f"1 validation error detected: Value null at '{key}' failed to satisfy constraint: " \
                       "Member must not be null"
        if not _JOB_NAME.match(body["jobName"]):
            return f"jobName {body['jobName']!r} does not match [a-zA-Z0-9]{{1,63}}(-*[a-zA-Z0-9\\+\\-\\.]){{0,63}}"
        if body.get("clientRequestToken") and not _TOKEN.match(body["clientRequestToken"]):
            return "clientRequestToken does not match [a-zA-Z0-9]{1,256}(-*[a-zA-Z0-9]){0,256}"
        if not _ROLE.match(body["roleArn"]):
            return f"roleArn {body['roleArn']!r} is not an IAM role ARN"
        hours = body.get("timeoutDurationInHours")
        if hours is not None and not 24 <= int(hours) <= 168:
            return "timeoutDurationInHours must be between 24 and 168"
        if any(j.name == body["jobName"] and j.token != body.get("clientRequestToken") for j in self.jobs.values()):
            return f"a job named {body['jobName']!r} exists already"
        return ""

    def get(self, identifier: str) -> tuple[int, dict[str, Any]]:
        self.counters["get_requests"] += 1
        job = self._find(identifier)
        if job is None:
            return 404, _error("ResourceNotFoundException", f"job {identifier} not found")
        with self._lock:
            return 200, job.describe()

    def stop(self, identifier: str) -> tuple[int, dict[str, Any]]:
        self.counters["stop_requests"] += 1
        job = self._find(identifier)
        if job is None:
            return 404, _error("ResourceNotFoundException", f"job {identifier} not found")
        with self._lock:
            if job.status in _TERMINAL or job.status == "Stopping":
                return 409, _error("ConflictException", f"job {job.job_id} is {job.status}")
            job.stop_requested = True
            job.status, job.modified = "Stopping", time.time()
        return 200, {}

    def list_jobs(self, query: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        name = (query.get("nameContains") or [""])[0]
        with self._lock:
            found = [j.describe() for j in self.jobs.values() if name in j.name]
        return 200, {"invocationJobSummaries": sorted(found, key=lambda j: -j["submitTime"])}

    def _find(self, identifier: str) -> Job | None:
        with self._lock:
            return self.jobs.get(identifier) or next(
                (j for j in self.jobs.values() if j.job_id == identifier), None)

    # -- jobs -------------------------------------------------------------------------------------------------

    def _advance_forever(self) -> None:
        while not self._stop.wait(min(self.step_s / 4, 0.05)):
            with self._lock:
                jobs = [j for j in self.jobs.values() if j.status not in _TERMINAL]
            for job in jobs:
                try:
                    self._advance(job)
                except Exception as exc:  # a stand-in bug must show, not hang the job
                    with self._lock:
                        job.status, job.message, job.ended = "Failed", f"stand-in error: {exc!r}", time.time()

    def _advance(self, job: Job) -> None:
        now = time.time()
        with self._lock:
            if job.stop_requested:
                if now - job.modified >= self.step_s:
                    job.status, job.modified, job.ended = "Stopped", now, now
                return
            if now - (job.modified or job.submitted) < self.step_s:
                return
            position = _QUEUED.index(job.status)
            if position + 1 < len(_QUEUED):
                job.status, job.modified = _QUEUED[position + 1], now
                if job.status != "Validating":
                    return
        if job.status == "Validating":
            self._validate(job)
            return
        self._process(job)

    def _validate(self, job: Job) -> None:
        count = sum(len(lines) for _, lines in self._inputs(job))
        if count < self.min_records:
            with self._lock:
                job.status, job.ended = "Failed", time.time()
                job.message = (f"The number of records in the input ({count}) is below the minimum of "
                               f"{self.min_records} records per batch inference job.")

    def _inputs(self, job: Job) -> list[tuple[str, list[bytes]]]:
        s3 = self._s3()
        bucket, key = _split(job.input_uri)
        if key.endswith(".jsonl"):
            keys = [key]
        else:
            listed = s3.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/").get("Contents") or []
            keys = sorted(o["Key"] for o in listed if o["Key"].endswith(".jsonl"))
        return [(k, s3.get_object(Bucket=bucket, Key=k)["Body"].read().splitlines()) for k in keys]

    def _process(self, job: Job) -> None:
        s3 = self._s3()
        out_bucket, out_prefix = _split(job.output_uri)
        folder = posixpath.join(out_prefix, job.job_id) if out_prefix else job.job_id
        totals: Counter[str] = Counter()
        for key, lines in self._inputs(job):
            if job.expire:
                lines = lines[: len(lines) // 2]
            outputs = [self._answer(job, line, totals) for line in lines if line.strip()]
            body = b"".join(json.dumps(o).encode() + b"\n" for o in outputs)
            s3.put_object(Bucket=out_bucket, Key=f"{folder}/{posixpath.basename(key)}.out", Body=body)
        manifest = {"totalRecordCount": totals["total"], "processedRecordCount": totals["total"],
                    "successRecordCount": totals["success"], "errorRecordCount": totals["error"],
                    "inputTokenCount": totals["input_tokens"], "outputTokenCount": totals["output_tokens"]}
        s3.put_object(Bucket=out_bucket, Key=f"{folder}/manifest.json.out", Body=json.dumps(manifest).encode())
        with self._lock:
            if job.stop_requested:
                job.status = "Stopped"
            elif job.expire:
                job.status, job.message = "Expired", "The job ran past its timeout."
            else:
                job.status = "PartiallyCompleted" if totals["error"] else "Completed"
            job.modified = job.ended = time.time()

    def _answer(self, job: Job, line: bytes, totals: Counter[str]) -> dict[str, Any]:
        totals["total"] += 1
        try:
            record = json.loads(line)
            rid, model_input = record["recordId"], record["modelInput"]
        except (ValueError, KeyError, TypeError):
            totals["error"] += 1
            return {"recordId": None, "error": {"errorCode": 400, "errorMessage": "Malformed input record."}}
        out: dict[str, Any] = {"recordId": rid, "modelInput": model_input}
        text = json.dumps(model_input, sort_keys=True)
        with self._lock:
            self.processed[text] += 1
        fault = self._fault(text)
        if fault is not None:
            totals["error"] += 1
            out["error"] = {"errorCode": fault.code, "errorMessage": _FAULT_MESSAGES.get(fault.code, "Failed.")}
            return out
        try:
            output, tokens_in, tokens_out = native_answer(job.model_id, model_input)
        except ValueError as exc:
            totals["error"] += 1
            out["error"] = {"errorCode": 400, "errorMessage": str(exc)}
            return out
        totals["success"] += 1
        totals["input_tokens"] += tokens_in
        totals["output_tokens"] += tokens_out
        out["modelOutput"] = output
        return out

    def _fault(self, text: str) -> RecordFault | None:
        with self._lock:
            for fault in self.record_faults:
                if fault.marker in text and (fault.times is None or fault.seen[text] < fault.times):
                    fault.seen[text] += 1
                    self.counters["record_faults"] += 1
                    return fault
        return None


_FAULT_MESSAGES = {429: "Too many tokens, please wait before trying again.",
                   500: "The model encountered an internal error.",
                   400: "Malformed input request, please reformat your input and try again."}


def _words(text: str) -> int:
    return max(1, len(text.split()))


def _last_text(parts: list[Any]) -> str:
    for part in reversed(parts):
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            return str(part["text"])
        if isinstance(part, str):
            return part
    return ""


Answer = tuple[dict[str, Any], int, int]


def _claude(base: str, body: dict[str, Any]) -> Answer:
    if body.get("anthropic_version") != ANTHROPIC_VERSION or not body.get("max_tokens"):
        raise ValueError("Malformed input request: anthropic_version and max_tokens are required")
    messages = body.get("messages") or []
    last = messages[-1]["content"] if messages else ""
    text = _last_text(last) if isinstance(last, list) else str(last)
    answer = f"Answer to: {text[:80]}"
    tin, tout = _words(json.dumps(messages)) + _words(str(body.get("system", ""))), _words(answer)
    return ({"id": f"msg_bdrk_{secrets.token_hex(8)}", "type": "message", "role": "assistant", "model": base,
             "content": [{"type": "text", "text": answer}], "stop_reason": "end_turn", "stop_sequence": None,
             "usage": {"input_tokens": tin, "output_tokens": tout}}, tin, tout)


def _cut(answer: str, limit: Any) -> tuple[str, str]:
    """The answer within ``limit`` tokens (a word each here), and its stop reason (``length`` when cut)."""
    words = answer.split()
    if isinstance(limit, int) and 0 < limit < len(words):
        return " ".join(words[:limit]), "length"
    return answer, "stop"


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("Malformed input request: prompt is required")
    return prompt


def _llama(base: str, body: dict[str, Any]) -> Answer:
    prompt = _prompt(body)
    user = prompt.rsplit("<|start_header_id|>user<|end_header_id|>\n\n", 1)[-1].split("<|eot_id|>")[0]
    answer, stop = _cut(f"Answer to: {user[:80]}", body.get("max_gen_len"))
    tin, tout = _words(prompt), _words(answer)
    return {"generation": answer, "prompt_token_count": tin, "generation_token_count": tout,
            "stop_reason": stop}, tin, tout


def _mistral(base: str, body: dict[str, Any]) -> Answer:
    prompt = _prompt(body)
    user = prompt.rsplit("[INST] ", 1)[-1].split(" [/INST]")[0]
    answer = f"Answer to: {user[:80]}"
    return {"outputs": [{"text": answer, "stop_reason": "stop"}]}, _words(prompt), _words(answer)


def _nova(base: str, body: dict[str, Any]) -> Answer:
    if body.get("schemaVersion") not in (None, "messages-v1") or not body.get("messages"):
        raise ValueError("Malformed input request: messages are required")
    text = _last_text(body["messages"][-1].get("content") or [])
    content: list[dict[str, Any]] = [{"text": f"Answer to: {text[:80]}"}]
    stop = "end_turn"
    tools = (body.get("toolConfig") or {}).get("tools") or []
    if tools:
        spec = tools[0]["toolSpec"]
        content = [{"toolUse": {"toolUseId": f"tooluse_{secrets.token_hex(6)}", "name": spec["name"],
                                "input": {"query": text[:40]}}}]
        stop = "tool_use"
    tin, tout = _words(json.dumps(body["messages"])), _words(json.dumps(content))
    return ({"output": {"message": {"role": "assistant", "content": content}}, "stopReason": stop,
             "usage": {"inputTokens": tin, "outputTokens": tout, "totalTokens": tin + tout}}, tin, tout)


def _titan_embedding(base: str, body: dict[str, Any]) -> Answer:
    text = body.get("inputText")
    if not isinstance(text, str) or not text:
        raise ValueError("Malformed input request: inputText is required")
    dims = int(body.get("dimensions") or 8)
    seed = sum(map(ord, text))
    return {"embedding": [((seed * (i + 7)) % 997) / 997.0 for i in range(dims)],
            "inputTextTokenCount": _words(text)}, _words(text), 0


_ANSWERS = (("anthropic.", _claude), ("meta.llama", _llama), ("mistral.", _mistral), ("amazon.nova-", _nova),
            ("amazon.titan-embed-text", _titan_embedding))


def native_answer(model_id: str, body: dict[str, Any]) -> Answer:
    """A deterministic answer in the family's native output shape, and its (input, output) token counts.

    :raises ValueError: the body is not what the family takes (Bedrock answers such a record with a 400).
    """
    base = base_model_id(model_id)
    for prefix, answer in _ANSWERS:
        if base.startswith(prefix):
            return answer(base, body)
    raise ValueError(f"The provided model identifier is invalid: {model_id}")


def _split(uri: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"__type": kind, "message": message}


class _Handler(BaseHTTPRequestHandler):
    server_stand_in: BedrockStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read counters, not access logs
        return

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        data = json.loads(raw) if raw else {}
        return data if isinstance(data, dict) else {}

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400 and "__type" in payload:
            self.send_header("x-amzn-ErrorType", payload["__type"])
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        path = urllib.parse.urlparse(self.path).path
        if path == "/model-invocation-job":
            status, payload, answer = self.server_stand_in.create(self._body())
            if not answer:
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._send(status, payload)
            return
        match = re.fullmatch(r"/model-invocation-job/(.+)/stop", path)
        if match:
            self._body()
            self._send(*self.server_stand_in.stop(urllib.parse.unquote(match.group(1))))
            return
        self._send(404, _error("UnknownOperationException", f"POST {path}"))

    def do_GET(self) -> None:
        parsed = urllib.parse.urlparse(self.path)
        if parsed.path == "/model-invocation-jobs":
            self._send(*self.server_stand_in.list_jobs(urllib.parse.parse_qs(parsed.query)))
            return
        match = re.fullmatch(r"/model-invocation-job/(.+)", parsed.path)
        if match:
            self._send(*self.server_stand_in.get(urllib.parse.unquote(match.group(1))))
            return
        self._send(404, _error("UnknownOperationException", f"GET {parsed.path}"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--s3-endpoint-url", required=True, help="the S3 API jobs read and write (moto's server)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--step-s", type=float, default=2.0, help="seconds in each job status")
    parser.add_argument("--min-records", type=int, default=100)
    args = parser.parse_args(argv)
    srv = BedrockStandIn(args.s3_endpoint_url, step_s=args.step_s, min_records=args.min_records).start(
        port=args.port)
    print(f"Bedrock batch stand-in on {srv.endpoint_url} (S3: {args.s3_endpoint_url})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.close()


if __name__ == "__main__":
    main()
