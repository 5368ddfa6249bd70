{{/* Names and labels shared by the chart's objects. */}}

{{- define "starlight.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "starlight.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "starlight.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "starlight.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "starlight.selector" -}}
app.kubernetes.io/name: {{ include "starlight.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "starlight.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The host workers pull from: registry.host, else the Service's cluster name. */}}
{{- define "starlight.registryHost" -}}
{{- if .Values.registry.host -}}
{{ .Values.registry.host }}
{{- else -}}
{{ include "starlight.fullname" . }}-registry.{{ .Release.Namespace }}.svc.cluster.local:{{ .Values.registry.service.port }}
{{- end -}}
{{- end -}}

{{/* The checks that make an invalid combination fail at install, not at run time. */}}
{{- define "starlight.validate" -}}
{{- $r := .Values.registry -}}
{{- if and $r.enabled (gt (int $r.replicas) 1) -}}
{{- if ne $r.storage.type "s3" -}}
{{- fail "registry.replicas > 1 needs registry.storage.type=s3: replicas must share one storage" -}}
{{- end -}}
{{- if ne $r.database.type "postgres" -}}
{{- fail "registry.replicas > 1 needs registry.database.type=postgres: replicas must share one index" -}}
{{- end -}}
{{- end -}}
{{- if not (has $r.storage.type (list "filesystem" "s3")) -}}
{{- fail (printf "registry.storage.type %q: want filesystem or s3" $r.storage.type) -}}
{{- end -}}
{{- if and (eq $r.storage.type "s3") (not $r.storage.s3.bucket) -}}
{{- fail "registry.storage.type=s3 needs registry.storage.s3.bucket" -}}
{{- end -}}
{{- if not (has $r.database.type (list "sqlite" "postgres")) -}}
{{- fail (printf "registry.database.type %q: want sqlite or postgres" $r.database.type) -}}
{{- end -}}
{{- if and (eq $r.database.type "postgres") (not $r.database.postgres.host) -}}
{{- fail "registry.database.type=postgres needs registry.database.postgres.host" -}}
{{- end -}}
{{- if not (has $r.auth.type (list "none" "htpasswd" "token")) -}}
{{- fail (printf "registry.auth.type %q: want none, htpasswd or token" $r.auth.type) -}}
{{- end -}}
{{- if and (eq $r.auth.type "htpasswd") (not $r.auth.htpasswd.secret) -}}
{{- fail "registry.auth.type=htpasswd needs registry.auth.htpasswd.secret (a Secret with key htpasswd)" -}}
{{- end -}}
{{- if and (eq $r.auth.type "token") (not (and $r.auth.token.realm $r.auth.token.service $r.auth.token.issuer $r.auth.token.rootCertBundleSecret)) -}}
{{- fail "registry.auth.type=token needs registry.auth.token.realm, service, issuer and rootCertBundleSecret" -}}
{{- end -}}
{{- if not (has .Values.worker.updateStrategy (list "OnDelete" "RollingUpdate")) -}}
{{- fail (printf "worker.updateStrategy %q: want OnDelete or RollingUpdate" .Values.worker.updateStrategy) -}}
{{- end -}}
{{- if not (has (int .Values.worker.containerd.version) (list 1 2)) -}}
{{- fail (printf "worker.containerd.version %v: want 1 (containerd 1.6, 1.7) or 2 (containerd 2.x)" .Values.worker.containerd.version) -}}
{{- end -}}
{{- end -}}
