{{/*
Named templates that put the broker into any pod. They are the chart's public
interface: this chart's Deployment uses them, and so can another chart that
lists token-broker as a dependency (with deployment.enabled: false), passing
the subchart's context:

  {{- $tb := index .Subcharts "token-broker" }}
  spec:
    securityContext:
      fsGroup: 10001                # the socket's group (see listen.socketMode)
    initContainers:                 # native style: the broker, first
      {{- include "token-broker.initContainers" $tb | nindent 6 }}
    containers:                     # classic style: the broker, first
      {{- include "token-broker.containers" $tb | nindent 6 }}
      - name: app
        env:
          {{- include "token-broker.appEnv" $tb | nindent 10 }}
        volumeMounts:
          {{- include "token-broker.appVolumeMounts" $tb | nindent 10 }}
    volumes:
      {{- include "token-broker.volumes" $tb | nindent 6 }}

Each renders a YAML list (possibly empty) at column 0.
*/}}

{{/* The broker as an init container with restartPolicy: Always (native). */}}
{{- define "token-broker.initContainers" -}}
{{- if eq .Values.sidecar.style "native" }}
{{- include "token-broker.container" . }}
{{- end }}
{{- end }}

{{/* The broker as an ordinary container (classic); put it first. */}}
{{- define "token-broker.containers" -}}
{{- if eq .Values.sidecar.style "classic" }}
{{- include "token-broker.container" . }}
{{- end }}
{{- end }}

{{/* The socket directory, read-only, for the app containers. */}}
{{- define "token-broker.appVolumeMounts" -}}
- name: token-broker-socket
  mountPath: {{ .Values.listen.socketDir }}
  readOnly: true
{{- end }}

{{/* Where the app finds the broker. */}}
{{- define "token-broker.appEnv" -}}
- name: TOKEN_BROKER_SOCKET
  value: {{ include "token-broker.socketPath" . | quote }}
{{- with .Values.listen.http }}
- name: TOKEN_BROKER_URL
  value: {{ printf "http://%s" . | quote }}
{{- end }}
{{- end }}

{{/* The pod volumes the broker uses. */}}
{{- define "token-broker.volumes" -}}
- name: token-broker-config
  configMap:
    name: {{ include "token-broker.configMapName" . }}
# Memory-backed: token files written beside the socket never reach a disk.
- name: token-broker-socket
  emptyDir:
    medium: Memory
    sizeLimit: 4Mi
{{- $sources := include "token-broker.credentialSources" . | trim }}
{{- if $sources }}
# Only the broker mounts this, so its files may be readable by any uid.
- name: token-broker-credentials
  projected:
    defaultMode: 0444
    sources:
      {{- $sources | nindent 6 }}
{{- end }}
{{- end }}

{{/* The broker container itself. */}}
{{- define "token-broker.container" -}}
{{- $v := .Values }}
- name: token-broker
  image: {{ include "token-broker.image" . | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if eq $v.sidecar.style "native" }}
  # A native sidecar (Kubernetes 1.29+): it keeps running beside the app,
  # which starts only after this container's startupProbe has passed.
  restartPolicy: Always
  {{- end }}
  args: ["serve", "-c", "/etc/token-broker/config.yaml"]
  env:
    - name: TOKEN_BROKER_SOCKET
      value: {{ include "token-broker.socketPath" . | quote }}
    {{- if $v.devIssuer.enabled }}
    # DEVELOPMENT ONLY: the embedded issuer's copy of the demo secret.
    - name: TOKEN_BROKER_DEV_ISSUER_SECRET
      valueFrom:
        secretKeyRef:
          name: {{ include "token-broker.devSecretName" . }}
          key: client-secret
    {{- end }}
    {{- with $v.broker.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: broker-metrics
      containerPort: {{ int $v.listen.metricsPort }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /readyz
      port: broker-metrics
    {{- toYaml $v.broker.startupProbe | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: broker-metrics
    {{- toYaml $v.broker.livenessProbe | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: broker-metrics
    {{- toYaml $v.broker.readinessProbe | nindent 4 }}
  {{- if and (eq $v.sidecar.style "classic") $v.sidecar.holdAppUntilReady }}
  lifecycle:
    # The kubelet starts the next container only when this hook returns:
    # wait for /readyz, but never longer than holdTimeoutSeconds.
    postStart:
      exec:
        command:
          - python3
          - -c
          - |
            import time, urllib.request as r
            opener = r.build_opener(r.ProxyHandler({}))
            deadline = time.monotonic() + {{ int $v.sidecar.holdTimeoutSeconds }}
            while time.monotonic() < deadline:
                try:
                    opener.open("http://127.0.0.1:{{ int $v.listen.metricsPort }}/readyz", timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
  {{- end }}
  resources:
    {{- toYaml $v.broker.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.broker.securityContext | nindent 4 }}
  volumeMounts:
    - name: token-broker-config
      mountPath: /etc/token-broker
      readOnly: true
    - name: token-broker-socket
      mountPath: {{ $v.listen.socketDir }}
    {{- if include "token-broker.credentialSources" . | trim }}
    - name: token-broker-credentials
      mountPath: {{ include "token-broker.credentialsDir" . }}
      readOnly: true
    {{- end }}
    {{- with $v.broker.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
