"""Test doubles for labsync (a fake QLAB LIS, an in-memory LIS adapter, sample PDFs) that
other projects may reuse."""
