"""Batch jobs: many inputs, one resumable JSONL of results; on one machine or on a Ray cluster."""

from phi_onnx.batch.inputs import Request, read_requests
from phi_onnx.batch.job import JobSummary, answer, run_job
from phi_onnx.batch.output import ResultFile, check_output

__all__ = ["JobSummary", "Request", "ResultFile", "answer", "check_output", "read_requests", "run_job"]
