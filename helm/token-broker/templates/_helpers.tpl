{{/*
Internal helpers. Each takes this chart's context: its own, or, from another
chart that depends on this one, (index .Subcharts "token-broker").
*/}}

{{- define "token-broker.appVersion" -}}
{{- .Chart.AppVersion }}
{{- end }}

{{- define "token-broker.name" -}}
{{- default "token-broker" .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "token-broker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "token-broker.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "token-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "token-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The pods that run the broker: this chart's, or monitoring.podSelector. */}}
{{- define "token-broker.podSelector" -}}
{{- if .Values.monitoring.podSelector }}
{{- toYaml .Values.monitoring.podSelector }}
{{- else }}
{{- include "token-broker.selectorLabels" . }}
{{- end }}
{{- end }}

{{- define "token-broker.labels" -}}
{{ include "token-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ include "token-broker.appVersion" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | default "Helm" }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "token-broker.image" -}}
{{- $tag := .Values.image.tag | default (include "token-broker.appVersion" .) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "token-broker.configMapName" -}}
{{- printf "%s-config" (include "token-broker.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "token-broker.devSecretName" -}}
{{- printf "%s-dev-issuer" (include "token-broker.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "token-broker.socketPath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.listen.socketDir) .Values.listen.socketName }}
{{- end }}

{{/* Where the projected credentials volume is mounted in the broker. */}}
{{- define "token-broker.credentialsDir" -}}
/var/run/secrets/token-broker
{{- end }}

{{/*
Checks the schema cannot phrase well; each failure names the value to change.
*/}}
{{- define "token-broker.validate" -}}
{{- $v := .Values }}
{{- if and (not $v.devIssuer.enabled) (not $v.clients) }}
{{- fail "token-broker: no clients: add at least one under clients: (see values.yaml), or set devIssuer.enabled: true for the demo" }}
{{- end }}
{{- if and $v.devIssuer.enabled (hasKey $v.clients $v.devIssuer.clientName) }}
{{- fail (printf "token-broker: clients.%s clashes with the demo client devIssuer.clientName; rename one of them" $v.devIssuer.clientName) }}
{{- end }}
{{- if and $v.devIssuer.enabled (hasKey $v.environments "dev") }}
{{- fail "token-broker: environments.dev is the dev issuer's environment while devIssuer.enabled is true; rename yours" }}
{{- end }}
{{- range $name, $client := $v.clients }}
{{- range $key := list "client_secret" "private_key" }}
{{- if kindIs "string" (index $client $key) }}
{{- fail (printf "token-broker: clients.%s.%s is written in the values; credentials never go there. Put it in a Secret and write %s: {secretName: NAME, key: KEY}" $name $key $key) }}
{{- end }}
{{- end }}
{{- $env := $client.environment | default "" }}
{{- if not (or (hasKey $v.environments $env) (and $v.devIssuer.enabled (eq $env "dev"))) }}
{{- fail (printf "token-broker: clients.%s.environment is %q, which is not a key of environments:" $name $env) }}
{{- end }}
{{- end }}
{{- if and (eq $v.sidecar.style "native") .Capabilities }}
{{- if semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version }}
{{- fail (printf "token-broker: sidecar.style native needs Kubernetes 1.29 or newer, this is %s; set sidecar.style: classic" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- end }}
{{- if and (not $v.app.demo) $v.deployment.enabled }}
{{- if not (and $v.app.image.repository $v.app.image.tag) }}
{{- fail "token-broker: app.demo is false, so app.image.repository and app.image.tag must name your app's image (or set deployment.enabled: false)" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The sources of the projected credentials volume, as a YAML list (empty when
nothing is mounted).
*/}}
{{- define "token-broker.credentialSources" -}}
{{- $v := .Values }}
{{- if $v.devIssuer.enabled }}
- secret:
    name: {{ include "token-broker.devSecretName" . }}
    items:
      - key: client-secret
        path: clients/{{ $v.devIssuer.clientName }}/client-secret
{{- end }}
{{- range $name, $client := $v.clients }}
{{- range $key, $file := dict "client_secret" "client-secret" "private_key" "private-key.pem" }}
{{- $spec := index $client $key }}
{{- if and $spec (kindIs "map" $spec) (hasKey $spec "secretName") }}
- secret:
    name: {{ $spec.secretName }}
    items:
      - key: {{ $spec.key }}
        path: clients/{{ $name }}/{{ $file }}
{{- end }}
{{- end }}
{{- with $client.client_cert }}
{{- if hasKey . "secretName" }}
- secret:
    name: {{ .secretName }}
    items:
      - key: {{ .certKey | default "tls.crt" }}
        path: clients/{{ $name }}/tls.crt
      - key: {{ .keyKey | default "tls.key" }}
        path: clients/{{ $name }}/tls.key
{{- end }}
{{- end }}
{{- end }}
{{- range $name, $env := $v.environments }}
{{- with $env.ca_file }}
{{- if kindIs "map" . }}
{{- if hasKey . "configMapName" }}
- configMap:
    name: {{ .configMapName }}
    items:
      - key: {{ .key }}
        path: environments/{{ $name }}/ca.pem
{{- else }}
- secret:
    name: {{ .secretName }}
    items:
      - key: {{ .key }}
        path: environments/{{ $name }}/ca.pem
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The broker's config file, as the ConfigMap holds it.
*/}}
{{- define "token-broker.config" -}}
{{- $v := .Values }}
{{- $dir := include "token-broker.credentialsDir" . }}
{{- $listen := dict
      "unix" (include "token-broker.socketPath" .)
      "unix_mode" $v.listen.socketMode
      "unix_shared_dir" true
      "http" $v.listen.http
      "metrics" (printf "0.0.0.0:%d" (int $v.listen.metricsPort))
      "drain_timeout" $v.listen.drainTimeout
      "quit_callers" $v.listen.quitCallers }}
{{- range $key := list "guard" "limits" }}
{{- with index $v.listen $key }}
{{- $_ := set $listen $key . }}
{{- end }}
{{- end }}
{{- $environments := dict }}
{{- range $name, $env := $v.environments }}
{{- $out := deepCopy $env }}
{{- if kindIs "map" $env.ca_file }}
{{- $_ := set $out "ca_file" (printf "%s/environments/%s/ca.pem" $dir $name) }}
{{- end }}
{{- $_ := set $environments $name $out }}
{{- end }}
{{- $clients := dict }}
{{- range $name, $client := $v.clients }}
{{- $out := deepCopy $client }}
{{- range $key, $file := dict "client_secret" "client-secret" "private_key" "private-key.pem" }}
{{- $spec := index $client $key }}
{{- if and $spec (kindIs "map" $spec) (hasKey $spec "secretName") }}
{{- $_ := set $out $key (dict "file" (printf "%s/clients/%s/%s" $dir $name $file)) }}
{{- end }}
{{- end }}
{{- if and $client.client_cert (hasKey $client.client_cert "secretName") }}
{{- $_ := set $out "client_cert" (dict
      "cert" (printf "%s/clients/%s/tls.crt" $dir $name)
      "key" (printf "%s/clients/%s/tls.key" $dir $name)) }}
{{- end }}
{{- $_ := set $clients $name $out }}
{{- end }}
{{- $config := dict "listen" $listen "clients" $clients "environments" $environments
      "log" $v.log "watch_config" $v.watchConfig
      "exit_when_file_exists" $v.exitWhenFileExists }}
{{- if $v.refresh }}
{{- $_ := set $config "refresh" $v.refresh }}
{{- end }}
{{- range $key, $value := $v.extraConfig }}
{{- if has $key (list "listen" "clients" "environments" "refresh" "log" "watch_config" "exit_when_file_exists" "dev_issuer") }}
{{- fail (printf "token-broker: extraConfig.%s is written by the chart itself; use its own value instead (see values.yaml)" $key) }}
{{- end }}
{{- $_ := set $config $key $value }}
{{- end }}
{{- if $v.devIssuer.enabled }}
{{- $d := $v.devIssuer }}
{{- $_ := set $environments "dev" (dict
      "token_url" (printf "http://127.0.0.1:%d/oauth2/token" (int $d.port))) }}
{{- $_ := set $clients $d.clientName (dict
      "environment" "dev"
      "client_id" "m2m-demo"
      "client_secret" (dict "file" (printf "%s/clients/%s/client-secret" $dir $d.clientName))
      "scopes" $d.scopes) }}
{{- $_ := set $config "dev_issuer" (dict
      "listen" (printf "127.0.0.1:%d" (int $d.port))
      "token_lifetime" $d.tokenLifetime
      "clients" (dict "m2m-demo" (dict
        "secret" "${TOKEN_BROKER_DEV_ISSUER_SECRET}"
        "scopes" $d.scopes))) }}
{{- end }}
{{- toYaml $config }}
{{- end }}
