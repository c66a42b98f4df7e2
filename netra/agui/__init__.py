"""netra as an AG-UI agent: ``POST /agui`` takes an AG-UI ``RunAgentInput``
and answers with the AG-UI event stream of one netra run on that thread.

AG-UI is an additional way in, beside netra's own WebSocket protocol: the
same threads, agents, limits, approvals and isolation. A request streams
its run and owns it the way a WebSocket connection owns its runs, until
the run pauses at a tool call waiting for its user's approval: the stream
then ends with AG-UI's interrupt outcome, the server keeps the run, and a
request with ``resume`` entries decides and streams the rest.
docs/agui.md maps netra's events to AG-UI's.

The modules, one concept each: ``_endpoint`` (the HTTP request and its
refusals), ``_input`` (the body read), ``_runs`` (the server's table of
AG-UI runs) and ``_run`` (one run and who streams it), ``_stream`` (the
response body), ``_events`` (the translation) and ``_interrupts``
(approvals as interrupts, resume entries as decisions).
"""

from ._endpoint import PATH as PATH, register_agui as register_agui
