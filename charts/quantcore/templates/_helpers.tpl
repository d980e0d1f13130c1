{{/* Names ------------------------------------------------------------------------------------- */}}
{{/* A name cut to at most .max characters that stays unique: the name itself when it fits, else
     its first max-9 characters, "-" and the first 8 hex digits of the sha256 of the whole name, so
     two long names that share a prefix never end up equal. ctx: dict name max */}}
{{- define "quantcore.truncName" -}}
{{- if le (len .name) (int .max) -}}
{{- .name -}}
{{- else -}}
{{- printf "%s-%s" (.name | trunc (int (sub .max 9)) | trimSuffix "-") (.name | sha256sum | trunc 8) -}}
{{- end -}}
{{- end -}}

{{- define "quantcore.name" -}}
{{- include "quantcore.truncName" (dict "name" (default .Chart.Name .Values.nameOverride) "max" 40) -}}
{{- end -}}

{{- define "quantcore.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- include "quantcore.truncName" (dict "name" .Values.fullnameOverride "max" 40) -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- include "quantcore.truncName" (dict "name" .Release.Name "max" 40) -}}
{{- else -}}
{{- include "quantcore.truncName" (dict "name" (printf "%s-%s" .Release.Name $name) "max" 40) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The ServiceAccount of every pod. With serviceAccount.create: false and no name, the
     namespace's `default` account (rbac.yaml refuses to bind a Role to it). */}}
{{- define "quantcore.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "quantcore.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Job name of a run, at most 63 characters (the Job controller puts it into a label). qat
     Jobs get at most 52: their pods are named <job>-<index> and their headless Service shares the
     Job's name. ctx: dict root, run */}}
{{- define "quantcore.jobName" -}}
{{- $max := ternary 52 63 (eq .run.mode "qat") -}}
{{- include "quantcore.truncName" (dict "name" (printf "%s-%s" (include "quantcore.fullname" .root) .run.name) "max" $max) -}}
{{- end -}}

{{/* The name of a RayJob, at most 47 characters: KubeRay derives longer names from it (RayCluster
     <name>-<5 chars>, head Service <cluster>-head-svc) and rejects longer RayJob names.
     ctx: dict root, name (the block's `name`) */}}
{{- define "quantcore.rayJobName" -}}
{{- include "quantcore.truncName" (dict "name" (printf "%s-%s" (include "quantcore.fullname" .root) .name) "max" 47) -}}
{{- end -}}

{{/* The chart's own labels (what selectors and tools rely on). ctx: root */}}
{{- define "quantcore.chartLabels" -}}
app.kubernetes.io/name: {{ include "quantcore.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: quantcore
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* Labels of an object: the chart's labels, the release-wide `labels`, then .extra (maps merged in
     that order). A user label may not change a label the chart sets (selectors depend on them).
     ctx: dict root, component (may be ""), run (run name, may be ""), extra (map, may be nil),
     where (values path of .extra, for the error message) */}}
{{- define "quantcore.labelsFor" -}}
{{- $own := fromYaml (include "quantcore.chartLabels" .root) -}}
{{- with .component }}{{ $_ := set $own "app.kubernetes.io/component" . }}{{ end -}}
{{- with .run }}{{ $_ := set $own "quantcore.io/run" . }}{{ end -}}
{{- $out := deepCopy $own -}}
{{- range $i, $src := list (dict "labels" (default (dict) .root.Values.labels) "where" "labels") (dict "labels" (default (dict) .extra) "where" .where) -}}
{{- range $k, $v := $src.labels -}}
{{- if and (hasKey $own $k) (ne (toString (get $own $k)) (toString $v)) -}}
{{- fail (printf "%s: label %s is set by the chart (%s); choose another key" $src.where $k (get $own $k)) -}}
{{- end -}}
{{- $_ := set $out $k (toString $v) -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* metadata.labels of the release-wide objects (no component). ctx: root */}}
{{- define "quantcore.labels" -}}
{{- include "quantcore.labelsFor" (dict "root" . "component" "" "run" "" "extra" nil "where" "") -}}
{{- end -}}

{{/* metadata of a pod template: labels (as "quantcore.labelsFor", plus podLabels) and annotations
     (podAnnotations, then .annotations; later keys win).
     ctx: dict root, component, run, labels (map), annotations (map), where */}}
{{- define "quantcore.podMetadata" -}}
{{- $extra := merge (deepCopy (default (dict) .labels)) (deepCopy (default (dict) .root.Values.podLabels)) -}}
labels:
  {{- include "quantcore.labelsFor" (dict "root" .root "component" .component "run" .run "extra" $extra "where" (printf "%s / podLabels" .where)) | nindent 2 }}
{{- $ann := mergeOverwrite (deepCopy (default (dict) .root.Values.podAnnotations)) (deepCopy (default (dict) .annotations)) -}}
{{- range $k, $v := $ann }}{{ if kindIs "invalid" $v }}{{ $_ := unset $ann $k }}{{ end }}{{ end -}}
{{- with $ann }}
annotations:
  {{- range $k, $v := . }}
  {{ $k }}: {{ toString $v | quote }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "quantcore.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}
{{- end -}}

{{/* Always for a tag (tags move: the node must not run a stale copy), IfNotPresent for a digest
(immutable); image.pullPolicy overrides. */}}
{{- define "quantcore.pullPolicy" -}}
{{- .Values.image.pullPolicy | default (ternary "IfNotPresent" "Always" (ne .Values.image.digest "")) -}}
{{- end -}}

{{/* Pod security (Kubernetes "restricted" profile; not configurable apart from the ids) -------- */}}
{{- define "quantcore.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "quantcore.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* S3 settings as environment variables (boto3's standard names); credentials by Secret reference */}}
{{- define "quantcore.s3Env" -}}
{{- $s3 := .Values.s3 -}}
{{- if $s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ $s3.endpoint | quote }}
{{- end }}
{{- if $s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ $s3.region | quote }}
- name: AWS_REGION
  value: {{ $s3.region | quote }}
{{- end }}
{{- if $s3.maxAttempts }}
- name: AWS_MAX_ATTEMPTS
  value: {{ $s3.maxAttempts | quote }}
{{- end }}
{{- if $s3.retryMode }}
- name: AWS_RETRY_MODE
  value: {{ $s3.retryMode | quote }}
{{- end }}
{{- if $s3.secretName }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $s3.secretName }}
      key: {{ $s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $s3.secretName }}
      key: {{ $s3.secretAccessKeyKey }}
{{- if $s3.sessionTokenKey }}
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $s3.secretName }}
      key: {{ $s3.sessionTokenKey }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Writable scratch volumes for a read-only root filesystem. ctx: dict root, tmpSize, cacheSize, shmSize */}}
{{- define "quantcore.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmpSize }}
- name: cache
  emptyDir:
    sizeLimit: {{ .cacheSize }}
# DataLoader workers / the Ray object store use shared memory; the runtime default is 64 MiB.
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- if .root.Values.recipes }}
- name: recipes
  configMap:
    name: {{ include "quantcore.fullname" .root }}-recipes
{{- end }}
{{- end -}}

{{- define "quantcore.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
- name: dshm
  mountPath: /dev/shm
{{- if .Values.recipes }}
- name: recipes
  mountPath: /etc/quantcore/recipes
  readOnly: true
{{- end }}
{{- end -}}

{{/* A recipe reference as passed to --recipe: inline recipes become their mounted path. ctx: dict root, ref */}}
{{- define "quantcore.recipeArg" -}}
{{- if hasKey .root.Values.recipes .ref -}}
{{- printf "/etc/quantcore/recipes/%s.yaml" .ref -}}
{{- else -}}
{{- .ref -}}
{{- end -}}
{{- end -}}

{{/* resources with the GPU count added. ctx: dict resources, gpus, gpuName */}}
{{- define "quantcore.resources" -}}
{{- $res := deepCopy (default (dict) .resources) -}}
{{- if gt (int .gpus) 0 -}}
{{- $req := deepCopy (default (dict) $res.requests) -}}
{{- $lim := deepCopy (default (dict) $res.limits) -}}
{{- $_ := set $req .gpuName (int .gpus) -}}
{{- $_ := set $lim .gpuName (int .gpus) -}}
{{- $_ := set $res "requests" $req -}}
{{- $_ := set $res "limits" $lim -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* Scheduling for a pod: GPU node selector/tolerations when it uses GPUs, plus its own; the
     priority class; the scheduler (`volcano` when a Volcano queue is set and no other name is).
     ctx: dict root, gpus, nodeSelector, tolerations, affinity, priorityClassName, schedulerName,
     volcanoQueue */}}
{{- define "quantcore.scheduling" -}}
{{- $gpu := .root.Values.gpu -}}
{{- $sel := dict -}}
{{- $tol := list -}}
{{- if gt (int .gpus) 0 -}}
{{- $sel = merge $sel (deepCopy (default (dict) $gpu.nodeSelector)) -}}
{{- $tol = concat $tol $gpu.tolerations -}}
{{- end -}}
{{- $sel = mergeOverwrite $sel (deepCopy (default (dict) .nodeSelector)) -}}
{{- range $k, $v := $sel }}{{ if kindIs "invalid" $v }}{{ $_ := unset $sel $k }}{{ end }}{{ end -}}
{{- $tol = concat $tol (default (list) .tolerations) -}}
{{- with $sel }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tol }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with (default (ternary "volcano" "" (not (empty .volcanoQueue))) .schedulerName) }}
schedulerName: {{ . }}
{{- end }}
{{- end -}}

{{/* Kueue and Volcano are alternatives: both would admit the same pods against separate quotas.
     ctx: dict queueName, volcanoQueue, where */}}
{{- define "quantcore.checkQueues" -}}
{{- if and .queueName .volcanoQueue -}}
{{- fail (printf "%s: set queueName (Kueue) or volcanoQueue (Volcano), not both" .where) -}}
{{- end -}}
{{- end -}}

{{/* Quantities ----------------------------------------------------------------------------------- */}}
{{/* A Kubernetes quantity (e.g. 8Gi, 500M, 1.5G, 1073741824) in bytes, as a decimal string.
     ctx: dict q, where */}}
{{- define "quantcore.bytes" -}}
{{- $q := toString .q -}}
{{- $m := regexFind "^[0-9]*\\.?[0-9]+" $q -}}
{{- $suffix := trimPrefix $m $q -}}
{{- $factors := dict "" 1.0 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 -}}
{{- if or (not $m) (not (hasKey $factors $suffix)) -}}
{{- fail (printf "%s: %q is not a byte quantity (e.g. 8Gi, 512Mi, 16G)" .where $q) -}}
{{- end -}}
{{- printf "%d" (int64 (floor (mulf (float64 $m) (get $factors $suffix)))) -}}
{{- end -}}

{{/* A CPU quantity (e.g. 8, 500m, 1.5) in millicores, as a decimal string. ctx: dict q, where */}}
{{- define "quantcore.millicpu" -}}
{{- $q := toString .q -}}
{{- if regexMatch "^[0-9]+m$" $q -}}
{{- trimSuffix "m" $q -}}
{{- else if regexMatch "^[0-9]*\\.?[0-9]+$" $q -}}
{{- printf "%d" (int64 (floor (mulf (float64 $q) 1000.0))) -}}
{{- else -}}
{{- fail (printf "%s: %q is not a CPU quantity (e.g. 8, 500m)" .where $q) -}}
{{- end -}}
{{- end -}}
