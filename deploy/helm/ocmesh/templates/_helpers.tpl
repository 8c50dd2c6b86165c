{{/* The release's name for its objects. */}}
{{- define "ocmesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ocmesh.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ocmesh.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Every site's mesh address (its own included: a site recognises itself by its certificate and drops that entry). */}}
{{- define "ocmesh.peers" -}}
{{- $name := include "ocmesh.fullname" . -}}
{{- $port := .Values.ports.mesh -}}
{{- $ns := .Release.Namespace -}}
{{- range $i := until (int .Values.sites) -}}
{{- if $i }},{{ end }}{{ $name }}-{{ $i }}.{{ $name }}-mesh.{{ $ns }}.svc:{{ $port }}
{{- end -}}
{{- end -}}

{{- define "ocmesh.adminSecret" -}}
{{- default (printf "%s-admin" (include "ocmesh.fullname" .)) .Values.existingAdminSecret -}}
{{- end -}}

{{- define "ocmesh.tlsSecret" -}}
{{- default (printf "%s-tls" (include "ocmesh.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}
