{{- define "edgescope.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "edgescope.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "edgescope.labels" -}}
{{ include "edgescope.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "edgescope.tlsSecret" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "edgescope.fullname" .)) -}}
{{- end -}}

{{- define "edgescope.tokensSecret" -}}
{{- .Values.tokens.existingSecret | default (printf "%s-tokens" (include "edgescope.fullname" .)) -}}
{{- end -}}

{{- define "edgescope.claim" -}}
{{- .Values.modelRepository.pvc.existingClaim | default (printf "%s-models" (include "edgescope.fullname" .)) -}}
{{- end -}}

{{/* The ConfigMap key and environment variable of an option: "deadline-ms" -> EDGESCOPE_DEADLINE_MS. */}}
{{- define "edgescope.optionVar" -}}
{{- printf "EDGESCOPE_%s" (. | upper | replace "-" "_") -}}
{{- end -}}

{{/* The exec probe: the image's gRPC health check, over TLS when the server speaks it. */}}
{{- define "edgescope.healthCommand" -}}
exec:
  command:
    - python3
    - /opt/edgescope/healthcheck.py
    - --target
    - 127.0.0.1:{{ .Values.service.grpcPort }}
    - --tls-ca
    - /run/secrets/edgescope/tls/ca.crt
    - --server-name
    - {{ .Values.tls.serverName | quote }}
    {{- if .Values.tls.clientAuth }}
    - --tls-cert
    - /run/secrets/edgescope/tls/tls.crt
    - --tls-key
    - /run/secrets/edgescope/tls/tls.key
    {{- end }}
{{- end -}}
