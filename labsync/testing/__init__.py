"""Test doubles for labsync (a fake QLAB LIS, sample PDFs) that other projects may reuse."""
