"""The operator station (`stripinspect ui`): a browser view of the line that the model learns from.

A process of its own beside the daemons: it subscribes to their streams (and the coil
service's), serves pages with live updates to logged-in users, and sends the operators'
feedback (false alarms, defect classes) to the daemons' control sockets."""
