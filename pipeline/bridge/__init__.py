"""The plant bridge (`stripinspect bridge`): OPC UA, Modbus TCP and MQTT beside the daemons.

A process of its own: it subscribes to the camera daemons' alert streams (and the coil
service's, when one runs), numbers every defect once in its own journal, and hands them to
each protocol through a bounded queue of its own; commands from the plant (coil start and end,
recipes) go to the daemons' control sockets. ``model`` holds the types every protocol shares.
"""
