"""certmq broker side: the CA core, its stores, the amqtt plugin, and the ``certmq`` command.

Importing this package is cheap: submodules pull in their own dependencies.
"""
