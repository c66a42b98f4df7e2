"""netra as an AG-UI agent: ``POST /agui`` takes an AG-UI ``RunAgentInput``
and answers with the AG-UI event stream of one netra run on that thread.

AG-UI is an additional way in, beside netra's own WebSocket protocol: the
same threads, agents, limits and isolation, one HTTP request owning one run
the way a WebSocket connection owns its runs. docs/agui.md maps netra's
events to AG-UI's.
"""

from ._endpoint import PATH as PATH, register_agui as register_agui
