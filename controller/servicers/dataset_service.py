"""DatasetService: upload, describe, list and delete datasets (controller/domain/uploads.py);
and the agents' FetchDataset stream (served by the AgentService servicer with `fetch`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from common.proto.loadtest.v1 import agent_service_pb2, dataset_service_pb2, dataset_service_pb2_grpc
from controller.domain.errors import FieldViolation, InvalidArgument
from controller.domain.results.message import timestamp
from controller.domain.uploads import DatasetLibrary
from controller.servicers.errors import unary_errors
from controller.store.datasets import DatasetRecord


def dataset_info(record: DatasetRecord) -> dataset_service_pb2.DatasetInfo:
    return dataset_service_pb2.DatasetInfo(
        id=record.dataset_id,
        name=record.name,
        format=record.format,  # type: ignore[arg-type]
        size_bytes=record.size,
        sha256=record.sha256,
        entry_count=record.entry_count,
        create_time=timestamp(record.created_at),
        span_s=record.span_s,
    )


async def _chunks(
    first: dataset_service_pb2.UploadDatasetRequest, rest: AsyncIterator[dataset_service_pb2.UploadDatasetRequest]
) -> AsyncIterator[bytes]:
    del first
    async for message in rest:
        if message.WhichOneof("body") != "chunk":
            raise InvalidArgument([FieldViolation("header", "only the first message is a header")])
        yield message.chunk


class DatasetServiceServicer(dataset_service_pb2_grpc.DatasetServiceServicer):
    def __init__(self, library: DatasetLibrary) -> None:
        self._library = library

    @unary_errors
    async def UploadDataset(
        self,
        request_iterator: AsyncIterator[dataset_service_pb2.UploadDatasetRequest],
        context: grpc.aio.ServicerContext,
    ) -> dataset_service_pb2.UploadDatasetResponse:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("body") != "header":
            raise InvalidArgument([FieldViolation("header", "required: the first message is the header")])
        header = first.header
        record, present = await self._library.upload(
            header.name, header.format, header.size_bytes, _chunks(first, request_iterator)
        )
        return dataset_service_pb2.UploadDatasetResponse(dataset=dataset_info(record), already_present=present)

    @unary_errors
    async def GetDataset(
        self, request: dataset_service_pb2.GetDatasetRequest, context: grpc.aio.ServicerContext
    ) -> dataset_service_pb2.GetDatasetResponse:
        return dataset_service_pb2.GetDatasetResponse(dataset=dataset_info(await self._library.get(request.dataset_id)))

    @unary_errors
    async def ListDatasets(
        self, request: dataset_service_pb2.ListDatasetsRequest, context: grpc.aio.ServicerContext
    ) -> dataset_service_pb2.ListDatasetsResponse:
        records, token = await self._library.list(request.page_size, request.page_token, request.format)
        return dataset_service_pb2.ListDatasetsResponse(
            datasets=[dataset_info(r) for r in records], next_page_token=token
        )

    @unary_errors
    async def DeleteDataset(
        self, request: dataset_service_pb2.DeleteDatasetRequest, context: grpc.aio.ServicerContext
    ) -> dataset_service_pb2.DeleteDatasetResponse:
        await self._library.delete(request.dataset_id)
        return dataset_service_pb2.DeleteDatasetResponse()


async def fetch(
    library: DatasetLibrary, request: agent_service_pb2.FetchDatasetRequest
) -> AsyncIterator[agent_service_pb2.FetchDatasetResponse]:
    """FetchDataset's messages: the first carries the size, digest and format with the first chunk."""
    record = await library.get(request.dataset_id)
    first = True
    async for blob in library.content(record):
        if first:
            yield agent_service_pb2.FetchDatasetResponse(
                chunk=blob,
                size_bytes=record.size,
                sha256=record.sha256,
                format=record.format,  # type: ignore[arg-type]
            )
            first = False
        else:
            yield agent_service_pb2.FetchDatasetResponse(chunk=blob)
    if first:  # no chunk at all (cannot happen: empty uploads are refused)
        yield agent_service_pb2.FetchDatasetResponse(
            size_bytes=record.size,
            sha256=record.sha256,
            format=record.format,  # type: ignore[arg-type]
        )
