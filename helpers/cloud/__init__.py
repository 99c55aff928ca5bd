"""The cloud API that notebooks call, the same in both modes (local cloud and real AWS).

Settings and resource names (:mod:`settings`), boto3 clients (:mod:`clients`), the first
call of every notebook (:mod:`session`), the execution role's policies (:mod:`iam`), the
deployment package and the function's configuration (:mod:`deploy`), transfers
(:mod:`transfer`), where each upload stands (:mod:`status`), the function's logs
(:mod:`logs`), what a run cost (:mod:`costs`) and deleting everything (:mod:`cleanup`).
"""
