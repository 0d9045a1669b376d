"""How the daemon's features are put together and fed.

`app.App` is what every feature gets at setup; `features` lists the features
and checks what they need from each other (`services`); `dispatch` hands
each incoming message to its owner; `caches` keeps the store-row caches
honest; `fairslots` shares request slots between callers.
"""
