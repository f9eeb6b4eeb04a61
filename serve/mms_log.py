"""The model server's (Java) log configuration: what MMS prints, written for each server's run.

sagemaker-inference's own configuration prints two lines per request (the worker's response
time and an access line) and writes every line a second time to files in LOG_LOCATION, which
`serve` deletes when it stops. Ours prints everything to stdout (a container's log, CloudWatch
on SageMaker) and nothing per request unless asked: start-up, the workers' own output (a failed
load's traceback among it) and every warning stay.
"""

from __future__ import annotations

_TEMPLATE = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
    <Appenders>
        <Console name="STDOUT" target="SYSTEM_OUT">
            <PatternLayout pattern="%d{{ISO8601}} [%-5p] %t %c - %m%n"/>
        </Console>
    </Appenders>
    <Loggers>
        <Logger name="io.netty" level="error"/>
        <Logger name="org.apache" level="off"/>
        <Logger name="ACCESS_LOG" level="{per_request}"/>
        <Logger name="com.amazonaws.ml.mms.wlm.WorkerThread" level="{per_request}"/>
        <Logger name="com.amazonaws.ml.mms" level="info"/>
        <Root level="warn">
            <AppenderRef ref="STDOUT"/>
        </Root>
    </Loggers>
</Configuration>
"""


def log4j2_config(access_log: bool) -> str:
    """access_log: also a line per request (the backend's time, then method, path, status, ms)."""
    return _TEMPLATE.format(per_request="info" if access_log else "warn")
