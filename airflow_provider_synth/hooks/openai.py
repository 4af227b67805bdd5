"""Hooks for the OpenAI and Azure OpenAI Batch API.

One connection turns into one SDK client through :meth:`OpenAIBatchHook._client_kwargs`, shared by the sync
hook (operators, sensors in poke mode) and :class:`OpenAIBatchAsyncHook` (triggers). The client class follows
the connection's type: ``synth_openai`` and the official provider's ``openai`` type build ``OpenAI``;
``synth_azure_openai`` builds ``AzureOpenAI`` (API key, or a Microsoft Entra ID token from ``azure-identity``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from airflow.providers.common.compat.connection import get_async_extra_dejson
from airflow.providers.common.compat.sdk import BaseHook, redact

from airflow_provider_synth._compat import aget_connection
from airflow_provider_synth.batch.landing import landing
from airflow_provider_synth.batch.paths import open_path
from airflow_provider_synth.batch.requests import Endpoint, UrlForm, service_url
from airflow_provider_synth.batch.results import is_transient_status
from airflow_provider_synth.batch.status import IN_PROGRESS_STATUSES as IN_PROGRESS_STATUSES  # re-exported
from airflow_provider_synth.batch.status import TERMINAL_STATUSES as TERMINAL_STATUSES  # re-exported
from airflow_provider_synth.batch.status import batch_state as batch_state  # re-exported
from airflow_provider_synth.batch.status import batch_summary as batch_summary  # re-exported
from airflow_provider_synth.exceptions import ConnectionAuthError, ConnectionConfigError

if TYPE_CHECKING:
    import httpx2
    from airflow.providers.common.compat.sdk import Connection
    from openai import AsyncAzureOpenAI, AsyncOpenAI, AzureOpenAI, OpenAI, RequestOptions
    from openai.types import Batch, FileDeleted, FileObject

    from airflow_provider_synth.hooks.openai_pool import Lease

CompletionWindow = Literal["24h"]
#: the endpoints a batch serves (the core's one list)
BatchEndpoint = Endpoint

OPENAI_CONN_TYPES = frozenset({"synth_openai", "openai"})
AZURE_CONN_TYPES = frozenset({"synth_azure_openai"})
#: The Entra ID scope Azure OpenAI accepts tokens for.
AZURE_TOKEN_SCOPE = "https://cognitiveservices.azure.com/.default"
_DOWNLOAD_CHUNK = 1 << 20
#: the default seconds between status checks of a service's batches, and of a server on this machine's
SERVICE_POLL_INTERVAL, LOCAL_POLL_INTERVAL = 60.0, 2.0
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})




def is_transient(error: BaseException) -> bool:
    """Whether a polling error may go away by itself (network, timeout, 429, 5xx).

    :param error: what a call of the hook raised.
    """
    import openai

    if isinstance(error, openai.APIConnectionError):  # includes APITimeoutError
        return True
    return isinstance(error, openai.APIStatusError) and is_transient_status(error.status_code)


_KEYS = re.compile(r"\b(?:sk|key|pk|rk)-[A-Za-z0-9_*\-]{4,}|\*{3,}[A-Za-z0-9]{2,}")


def auth_error(error: BaseException, hook: OpenAIBatchHook) -> ConnectionAuthError | None:
    """A 401/403 of the service as a :class:`~airflow_provider_synth.exceptions.ConnectionAuthError` naming the
    connection id and host and what to check (never the key, not even the service's masked echo of it);
    ``None`` for any other error."""
    import openai

    if not isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
        return None
    status = error.status_code
    said = _KEYS.sub("***", str(redact(str(getattr(error, "message", "") or error))))[:300]
    if status == 401:
        check = ("check the connection's API key (its password field"
                 + (", or the Entra ID settings in its extra" if hook.is_azure else "") + ") and that it is for this "
                 "host; a key that was rotated or revoked needs the connection updated")
    else:
        check = ("the key is valid but not allowed to do this: check its project/organisation, its permissions "
                 "(Files and Batches API access)" + (", and the deployment's access policy" if hook.is_azure else ""))
    host = str(getattr(hook.client, "base_url", "")) or "the service"
    return ConnectionAuthError(
        f"{host} refused the credentials of connection {hook.conn_id!r} (HTTP {status}: {said}): {check}. The "
        "task fails without retrying, since a retry would be refused the same way; nothing was paid for by the "
        "refused call.")


def stream_errors() -> tuple[type[BaseException], ...]:
    """What a response body cut mid-stream raises (the SDK retries requests, not a body being read):
    the HTTP transport's errors."""
    import httpx2
    import openai

    return (httpx2.TransportError, openai.APIConnectionError)


def token_provider_import_allowed() -> bool:
    """Whether the deployment lets connections name code to import (``[synth] allow_token_provider_import``).

    Read from the deployment's configuration on every use, never from the connection: the people who may
    edit connections are not always the people who may run code on workers and the triggerer.
    """
    from airflow.configuration import conf

    return conf.getboolean("synth", "allow_token_provider_import", fallback=False)


def _import_callable(path: str, conn_id: str) -> Callable[..., Any]:
    module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConnectionConfigError(f"Connection {conn_id!r}: cannot import {path!r}: {e}") from None
    if not callable(obj):
        raise ConnectionConfigError(f"Connection {conn_id!r}: {path!r} is not callable")
    return obj  # type: ignore[no-any-return]


def _number(extras: Mapping[str, Any], key: str, kind: type[int] | type[float], conn_id: str) -> Any:
    value = extras.get(key)
    if value in (None, ""):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConnectionConfigError(
            f"Connection {conn_id!r}: extra {key!r} must be a number, got {value!r}"
        ) from None


class OpenAIBatchHook(BaseHook):
    """Interact with the OpenAI (or Azure OpenAI) Files and Batches API.

    The connection's type picks the client: ``synth_openai``/``openai`` build ``openai.OpenAI``,
    ``synth_azure_openai`` builds ``openai.AzureOpenAI``. Every method wraps one API call and returns the
    SDK's types; SDK errors (``openai.APIStatusError``...) propagate after the SDK's own retries
    (``max_retries`` extra).

    .. seealso:: :doc:`/connections` for every connection field.

    :param conn_id: id of a ``synth_openai``, ``synth_azure_openai`` or ``openai`` connection.
    :param client_options: extra keyword arguments for the SDK client constructor (``http_client``,
        ``default_headers``...), applied over the connection's settings. Never put secrets here.
    """

    conn_name_attr = "conn_id"
    default_conn_name = "synth_openai_default"
    conn_type = "synth_openai"
    hook_name = "OpenAI Batch (synth)"
    #: where the Entra ID credentials come from; the async hook takes ``azure.identity.aio``'s
    _azure_identity_module = "azure.identity"

    def __init__(
        self,
        conn_id: str = default_conn_name,
        *,
        client_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id
        self.client_options = dict(client_options or {})
        self._is_azure: bool | None = None
        self._credential: Any = None

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Connection form for Airflow versions that do not read ``conn-fields`` from the provider info."""
        return {
            "hidden_fields": ["schema", "port", "login"],
            "relabeling": {"password": "API Key", "host": "Base URL"},
            "placeholders": {
                "host": "https://api.openai.com/v1 (leave empty for OpenAI)",
                "extra": '{"organization": "org-...", "project": "proj_...", "timeout": 600, "max_retries": 5}',
            },
        }

    # -- connection -> client ---------------------------------------------------------------------------------

    def _client_kwargs(self, conn: Connection, extras: Mapping[str, Any]) -> dict[str, Any]:
        """Turn a connection and its extras into the SDK client's keyword arguments.

        The one place connection fields are read; the sync and async clients both come from it.
        Also records whether the connection is Azure. Airflow's secret masker already knows the connection's
        secrets (it registers them when the connection is looked up), so messages go through ``redact``.
        """
        conn_type = (conn.conn_type or "").replace("-", "_")
        # form fields may arrive prefixed (``extra__<conn_type>__<name>``) from older Airflow UIs
        prefix = f"extra__{conn_type}__"
        extras = {k.removeprefix(prefix): v for k, v in extras.items()}
        if conn_type in AZURE_CONN_TYPES:
            self._is_azure = True
            kwargs = self._azure_kwargs(conn, extras)
        elif conn_type in OPENAI_CONN_TYPES:
            self._is_azure = False
            kwargs = self._openai_kwargs(conn, extras)
        else:
            raise ConnectionConfigError(
                f"Connection {self.conn_id!r} has type {conn.conn_type!r}; expected one of "
                f"{sorted(OPENAI_CONN_TYPES | AZURE_CONN_TYPES)}"
            )
        timeout = _number(extras, "timeout", float, self.conn_id)
        max_retries = _number(extras, "max_retries", int, self.conn_id)
        if timeout is not None:
            kwargs["timeout"] = timeout
        if max_retries is not None:
            kwargs["max_retries"] = max_retries
        kwargs.update(self.client_options)
        return kwargs

    def _openai_kwargs(self, conn: Connection, extras: Mapping[str, Any]) -> dict[str, Any]:
        if extras.get("auth_type", "api_key") != "api_key":
            raise ConnectionConfigError(
                f"Connection {self.conn_id!r}: auth_type {extras['auth_type']!r} is not supported; use an API key"
            )
        # the official provider's ``openai`` type keeps client settings in ``openai_client_kwargs``
        kwargs = dict(extras.get("openai_client_kwargs") or {})
        api_key = kwargs.pop("api_key", None) or conn.password
        base_url = kwargs.pop("base_url", None) or extras.get("base_url") or conn.host or None
        if not api_key:
            raise ConnectionConfigError(f"Connection {self.conn_id!r} has no API key (the password field)")
        kwargs["api_key"] = api_key
        if base_url:
            kwargs["base_url"] = base_url if "://" in base_url else f"https://{base_url}"
        for key in ("organization", "project"):
            if extras.get(key):
                kwargs[key] = extras[key]
        return kwargs

    def _azure_kwargs(self, conn: Connection, extras: Mapping[str, Any]) -> dict[str, Any]:
        endpoint = extras.get("azure_endpoint") or conn.host
        api_version = extras.get("api_version")
        if not endpoint:
            raise ConnectionConfigError(f"Connection {self.conn_id!r} has no Azure endpoint (the host field)")
        if not api_version:
            raise ConnectionConfigError(f"Connection {self.conn_id!r} has no 'api_version' extra")
        kwargs: dict[str, Any] = {
            "azure_endpoint": endpoint if "://" in endpoint else f"https://{endpoint}",
            "api_version": api_version,
        }
        if conn.password:
            kwargs["api_key"] = conn.password
        else:
            kwargs["azure_ad_token_provider"] = self._entra_token_provider(extras)
        return kwargs

    def _azure_credential_args(self, extras: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Pick the ``azure-identity`` credential class name and its arguments from the extras."""
        tenant_id, client_id, secret = (extras.get(k) for k in ("tenant_id", "client_id", "client_secret"))
        if tenant_id and client_id and secret:
            return "ClientSecretCredential", {"tenant_id": tenant_id, "client_id": client_id, "client_secret": secret}
        if secret:
            raise ConnectionConfigError(
                f"Connection {self.conn_id!r}: client_secret needs both tenant_id and client_id"
            )
        options = {}
        if extras.get("managed_identity_client_id") or client_id:
            options["managed_identity_client_id"] = extras.get("managed_identity_client_id") or client_id
        return "DefaultAzureCredential", options

    def _entra_token_provider(self, extras: Mapping[str, Any]) -> Callable[[], Any]:
        """A bearer-token provider for ``azure_ad_token_provider``: a custom callable or ``azure-identity``."""
        if extras.get("azure_ad_token_provider"):
            if not token_provider_import_allowed():
                raise ConnectionConfigError(
                    f"Connection {self.conn_id!r} names a Python callable in 'azure_ad_token_provider', and this "
                    "deployment does not import code named by connections. An administrator can allow it in "
                    "airflow.cfg ([synth] allow_token_provider_import = True, or the environment variable "
                    "AIRFLOW__SYNTH__ALLOW_TOKEN_PROVIDER_IMPORT=True); or use an API key or the Entra ID extras."
                )
            return _import_callable(str(extras["azure_ad_token_provider"]), self.conn_id)
        cls_name, args = self._azure_credential_args(extras)
        try:
            identity = importlib.import_module(self._azure_identity_module)
        except ImportError:
            raise ConnectionConfigError(
                "Microsoft Entra ID authentication needs azure-identity: "
                "pip install 'airflow-provider-synth[azure]'"
            ) from None
        self._credential = getattr(identity, cls_name)(**args)
        provider: Callable[[], Any] = identity.get_bearer_token_provider(
            self._credential, extras.get("token_scope") or AZURE_TOKEN_SCOPE
        )
        return provider

    def get_conn(self) -> OpenAI | AzureOpenAI:
        """Build the sync SDK client from the connection (one lookup, no network call)."""
        from openai import AzureOpenAI, OpenAI

        conn = self.get_connection(self.conn_id)
        kwargs = self._client_kwargs(conn, conn.extra_dejson)
        return AzureOpenAI(**kwargs) if self._is_azure else OpenAI(**kwargs)

    @cached_property
    def client(self) -> OpenAI | AzureOpenAI:
        """The sync SDK client, built on first use."""
        return self.get_conn()

    @cached_property
    def resource_id(self) -> str | None:
        """Azure only: the ARM id of the resource (extra ``resource_id``), for dashboard links."""
        extras = self.get_connection(self.conn_id).extra_dejson
        return extras.get("resource_id") or extras.get("extra__synth_azure_openai__resource_id") or None

    @property
    def is_azure(self) -> bool:
        """Whether the connection is an Azure OpenAI one (looks the connection up on first use)."""
        if self._is_azure is None:
            conn = self.get_connection(self.conn_id)
            self._is_azure = (conn.conn_type or "").replace("-", "_") in AZURE_CONN_TYPES
        return self._is_azure

    @property
    def default_poll_interval(self) -> float:
        """Seconds between status checks when a task sets none: :data:`LOCAL_POLL_INTERVAL` against a server on
        this machine (the local Batch API server finishes a batch in seconds), :data:`SERVICE_POLL_INTERVAL`
        against a service (whose batches take minutes to hours, and whose rate limits count every poll)."""
        host = (urllib.parse.urlsplit(str(self.client.base_url)).hostname or "").lower()
        return LOCAL_POLL_INTERVAL if host in LOOPBACK_HOSTS else SERVICE_POLL_INTERVAL

    @property
    def url_form(self) -> UrlForm:
        """How this service spells endpoints in batch lines and ``batches.create``: ``openai``
        (``/v1/chat/completions``) or ``azure`` (``/chat/completions``, as Azure's docs write it)."""
        return "azure" if self.is_azure else "openai"

    # -- files -----------------------------------------------------------------------------------------------

    def upload_file(
        self,
        path: Any,
        purpose: Literal["batch"] = "batch",
        *,
        filename: str | None = None,
        expires_after_s: int | None = None,
    ) -> FileObject:
        """Upload a file, streamed in chunks from a local path, URL or ``ObjectStoragePath``.

        :param path: local path, fsspec URL (``s3://...``) or ``ObjectStoragePath``.
        :param purpose: the file's purpose; ``batch`` for batch input.
        :param filename: name the API records; defaults to the path's last component.
        :param expires_after_s: the service deletes the file this many seconds after its creation
            (1 hour to 30 days); ``None`` keeps it until it is deleted.
        :return: the SDK's ``FileObject`` (its ``id`` is the ``input_file_id`` of a batch).
        """
        from openai import omit

        name = filename or os.path.basename(str(getattr(path, "path", path)).rstrip("/")) or "requests.jsonl"
        expiry = {"anchor": "created_at", "seconds": int(expires_after_s)} if expires_after_s else omit
        with open_path(path, "rb") as fp:
            # a (name, file object) tuple is streamed by the multipart encoder, and rewound on SDK retries;
            # a PathLike would be read whole into memory by the SDK
            return self.client.files.create(file=(name, fp, "application/jsonl"), purpose=purpose,
                                            expires_after=expiry)  # type: ignore[arg-type]

    def get_file(self, file_id: str) -> FileObject:
        """Retrieve a file's record (its ``bytes``: the size a download must have).

        :param file_id: the API file id.
        """
        return self.client.files.retrieve(file_id)

    def download_file(self, file_id: str, dest: Any, *, expected_bytes: int | None = None) -> int:
        """Stream a file's content into ``dest`` (local path, URL or ``ObjectStoragePath``), whole or not at all:
        see :func:`~airflow_provider_synth.batch.landing.landing`.

        :param file_id: the API file id (a batch's ``output_file_id`` or ``error_file_id``).
        :param dest: where to write; parent folders are created.
        :param expected_bytes: the size the file must have (the Files API ``bytes``); a download of another
            size is not kept (:class:`~airflow_provider_synth.batch.landing.IncompleteFileError`).
        :return: the number of bytes written.
        """
        with self.client.files.with_streaming_response.content(file_id) as response, \
                landing(dest, expected_bytes=expected_bytes) as out:
            written = 0
            for chunk in response.iter_bytes(_DOWNLOAD_CHUNK):
                out.write(chunk)
                written += len(chunk)
        return written

    def delete_file(self, file_id: str) -> FileDeleted:
        """Delete an uploaded or output file.

        :param file_id: the API file id.
        """
        return self.client.files.delete(file_id)

    def list_files(self, purpose: str | None = None) -> Iterator[FileObject]:
        """Iterate over the account's files, every page.

        :param purpose: only files with this purpose (``batch``, ``batch_output``...).
        """
        if purpose:
            yield from self.client.files.list(purpose=purpose)
        else:
            yield from self.client.files.list()

    # -- batches ---------------------------------------------------------------------------------------------

    def create_batch(
        self,
        input_file_id: str,
        endpoint: BatchEndpoint,
        completion_window: CompletionWindow = "24h",
        metadata: Mapping[str, str] | None = None,
        *,
        output_expires_after_s: int | None = None,
    ) -> Batch:
        """Create a batch over an uploaded JSONL file.

        :param input_file_id: id of a file uploaded with purpose ``batch``.
        :param endpoint: the endpoint every request line targets (``/v1/chat/completions``...); sent in the
            service's own form (:attr:`url_form`).
        :param completion_window: ``24h``, the only window the API offers.
        :param metadata: up to 16 string pairs; :meth:`find_batches` matches on them to re-attach.
        :param output_expires_after_s: the service deletes the batch's output and error files this many
            seconds after they are created (1 hour to 30 days); ``None`` keeps them until deleted.
        """
        from openai import omit

        expiry = {"anchor": "created_at", "seconds": int(output_expires_after_s)} if output_expires_after_s else omit
        return self.client.batches.create(
            input_file_id=input_file_id,
            endpoint=service_url(endpoint, self.url_form),  # type: ignore[arg-type]
            completion_window=completion_window,
            metadata=dict(metadata) if metadata else None,
            output_expires_after=expiry,  # type: ignore[arg-type]
        )

    def get_batch(self, batch_id: str) -> Batch:
        """Retrieve a batch.

        :param batch_id: the batch id.
        """
        return self.client.batches.retrieve(batch_id)

    def cancel_batch(self, batch_id: str) -> Batch:
        """Ask the API to cancel a batch; it passes through ``cancelling`` to ``cancelled``.

        :param batch_id: the batch id.
        """
        return self.client.batches.cancel(batch_id)

    def list_batches(self, *, page_size: int = 100) -> Iterator[Batch]:
        """Iterate over the account's batches, newest first, every page.

        :param page_size: batches fetched per API call.
        """
        yield from self.client.batches.list(limit=page_size)

    def find_batches(self, metadata: Mapping[str, str], *, created_after: float | None = None) -> list[Batch]:
        """Batches whose metadata contains every pair of ``metadata``: the way to re-attach after a retry.

        :param metadata: pairs that must all match (e.g. an idempotency key).
        :param created_after: epoch seconds; stop scanning at older batches (the list is newest first).
        :return: matching batches, newest first.
        """
        found = []
        for batch in self.list_batches():
            if created_after is not None and batch.created_at < created_after:
                break
            if batch.metadata and all(batch.metadata.get(k) == v for k, v in metadata.items()):
                found.append(batch)
        return found

    # -- synchronous requests --------------------------------------------------------------------------------

    def create_direct(self, url: str, body: Mapping[str, Any], *, custom_id: str | None = None,
                      timeout: float | None = None) -> dict[str, Any]:
        """Send one request of a batch file through the synchronous API, at the direct price, with the SDK's
        retries (``max_retries``); the body is sent as written (fields the SDK's typed methods do not know
        included). On Azure the body's ``model`` is the deployment.

        :param url: the request line's ``url`` (``/v1/chat/completions``, ``/v1/embeddings``, ``/v1/responses``,
            ``/v1/completions``).
        :param body: the request line's ``body``.
        :param custom_id: sent as ``X-Client-Request-Id``, so the request can be traced on the service's side.
        :param timeout: this request's timeout in seconds (flex processing answers slowly: OpenAI advises 15
            minutes); default: the client's.
        :return: the response body.
        :raises openai.APIStatusError: the service answered an error after the SDK's retries.
        """
        headers = {"X-Client-Request-Id": custom_id} if custom_id else {}
        path = url.removeprefix("/v1") if url.startswith("/v1/") else url
        options: RequestOptions = {"headers": headers}
        if timeout is not None:
            options["timeout"] = timeout
        result = self.client.post(path, cast_to=dict[str, Any], body=dict(body), options=options)
        return dict(result)

    def test_connection(self) -> tuple[bool, str]:
        """List the models: checks the credentials and spends nothing. The message never holds a secret."""
        try:
            self.client.models.list()
        except Exception as e:
            return False, str(redact(f"{type(e).__name__}: {e}"))
        return True, "Connection successfully tested"


class AzureOpenAIBatchHook(OpenAIBatchHook):
    """:class:`OpenAIBatchHook` for ``synth_azure_openai`` connections (the connection form and default id).

    Batch request lines name the Azure *deployment* as their ``model``.

    :param conn_id: id of a ``synth_azure_openai`` connection.
    :param client_options: extra keyword arguments for the SDK client constructor.
    """

    default_conn_name = "synth_azure_openai_default"
    conn_type = "synth_azure_openai"
    hook_name = "Azure OpenAI Batch (synth)"

    def __init__(
        self,
        conn_id: str = default_conn_name,
        *,
        client_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(conn_id, client_options=client_options, **kwargs)

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Connection form for Airflow versions that do not read ``conn-fields`` from the provider info."""
        return {
            "hidden_fields": ["schema", "port", "login"],
            "relabeling": {"password": "API Key (empty for Entra ID)", "host": "Azure endpoint"},
            "placeholders": {
                "host": "https://<resource>.openai.azure.com",
                "extra": '{"api_version": "2025-04-01-preview", "tenant_id": "...", "client_id": "...", '
                '"client_secret": "..."}',
            },
        }


class OpenAIBatchAsyncHook(OpenAIBatchHook):
    """The async side of :class:`OpenAIBatchHook`, for triggers: never blocks the event loop.

    The connection comes from the async lookup. Hooks of one ``conn_id`` on one event loop lease one shared
    ``AsyncOpenAI``/``AsyncAzureOpenAI`` (and, for Entra ID, one async credential) over one pooled HTTP client
    per loop (:mod:`~airflow_provider_synth.hooks.openai_pool`): a thousand triggers make one connection lookup
    and open a bounded number of sockets. With ``client_options`` the hook builds and owns its own client.
    Use it as ``async with``, or call :meth:`close`.

    :param conn_id: id of a ``synth_openai``, ``synth_azure_openai`` or ``openai`` connection.
    :param client_options: extra keyword arguments for the async SDK client constructor.
    """

    # async credentials fetch tokens without blocking the loop; close() releases them
    _azure_identity_module = "azure.identity.aio"

    def __init__(
        self,
        conn_id: str = OpenAIBatchHook.default_conn_name,
        *,
        client_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(conn_id, client_options=client_options, **kwargs)
        self._async_client: AsyncOpenAI | AsyncAzureOpenAI | None = None
        self._lease: Lease | None = None
        # concurrent first calls (a trigger polls its batches with gather) must attach one client, not several
        self._attach_lock = asyncio.Lock()

    async def get_async_client(self) -> AsyncOpenAI | AsyncAzureOpenAI:
        """The async SDK client: the loop's shared one for this connection, or the hook's own when
        ``client_options`` were given."""
        if self._async_client is None:
            async with self._attach_lock:
                if self._async_client is None and self.client_options:
                    self._async_client = (await self._build_async_client(None))[0]
                elif self._async_client is None:
                    from airflow_provider_synth.hooks.openai_pool import lease

                    self._lease = await lease(self.conn_id, self._build_shared_client)
                    self._async_client, self._is_azure = self._lease.client, self._lease.is_azure
        assert self._async_client is not None
        return self._async_client

    async def _build_async_client(
        self, http_client: httpx2.AsyncClient | None
    ) -> tuple[AsyncOpenAI | AsyncAzureOpenAI, dict[str, Any]]:
        from openai import AsyncAzureOpenAI, AsyncOpenAI

        conn = await aget_connection(self.conn_id, hook=self)
        kwargs = self._client_kwargs(conn, await get_async_extra_dejson(conn))
        if http_client is not None:
            kwargs["http_client"] = http_client
        return (AsyncAzureOpenAI(**kwargs) if self._is_azure else AsyncOpenAI(**kwargs)), kwargs

    async def _build_shared_client(self, http_client: httpx2.AsyncClient) -> tuple[Any, dict[str, Any], Any, bool]:
        client, kwargs = await self._build_async_client(http_client)
        credential, self._credential = self._credential, None  # the shared client owns it now
        return client, kwargs, credential, bool(self._is_azure)

    def _slots(self) -> asyncio.Semaphore | contextlib.nullcontext[None]:
        return self._lease.pool.slots if self._lease is not None else contextlib.nullcontext()

    async def aget_batch(self, batch_id: str) -> Batch:
        """Retrieve a batch without blocking the loop.

        :param batch_id: the batch id.
        """
        client = await self.get_async_client()
        async with self._slots():
            return await client.batches.retrieve(batch_id)

    async def aget_batch_state(self, batch_id: str) -> dict[str, Any]:
        """:func:`batch_summary` of a batch, retrieved with as few allocations as possible (triggers poll often).

        On the loop's shared client of a plain OpenAI connection the poll is one GET on the pooled aiohttp
        session, parsed by orjson; the SDK's request objects and pydantic ``Batch`` are not built. Those would
        survive into the oldest GC generation while a thousand polls are in flight and trigger full
        collections of the triggerer's heap (0.2 to 0.6 s pauses of the whole loop). Any other answer than
        200 with a batch, or any transport error, is retried once through the SDK (its retries, error types
        and messages); Azure and custom clients always use the SDK.

        :param batch_id: the batch id.
        """
        await self.get_async_client()
        if self._lease is not None:
            from airflow_provider_synth.hooks.openai_pool import direct_batch_state

            data = await direct_batch_state(self._lease, batch_id)
            if data is not None:
                return batch_state(data)
        return batch_summary(await self.aget_batch(batch_id))

    async def acancel_batch(self, batch_id: str) -> Batch:
        """Cancel a batch without blocking the loop.

        :param batch_id: the batch id.
        """
        client = await self.get_async_client()
        async with self._slots():
            return await client.batches.cancel(batch_id)

    async def close(self) -> None:
        """Release the client (idempotent): the hook's own is closed; a shared one when its last user leaves."""
        client, self._async_client = self._async_client, None
        credential, self._credential = self._credential, None
        held, self._lease = self._lease, None
        if held is not None:
            from airflow_provider_synth.hooks.openai_pool import release

            await release(held, self.conn_id)
        elif client is not None:
            await client.close()
        if credential is not None:
            await credential.close()

    async def __aenter__(self) -> OpenAIBatchAsyncHook:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
