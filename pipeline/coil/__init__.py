"""The coil product: coil tracking, the records of coils and their defects in strip coordinates,
periodic defects matched to their roll, grading and the end-of-coil report.

The daemon tracks coils (``tracking``) and tags what it publishes with the coil; the coil
service (``service``), a process of its own behind the proxy (``proxy``), places every camera's
defects on one coil map (``records``), finds roll marks (``periodic``), grades (``grading``) and
writes the report (``report``). The types they share are in ``model``.
"""
