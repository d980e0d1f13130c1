{{/* A list of arguments as one POSIX shell command line: words made only of safe characters stay
     as they are, anything else is single-quoted. ctx: the list */}}
{{- define "quantcore.shellJoin" -}}
{{- $quoted := list -}}
{{- range . -}}
{{- $a := toString . -}}
{{- if regexMatch "^[A-Za-z0-9_./:=@%+,-]+$" $a -}}
{{- $quoted = append $quoted $a -}}
{{- else -}}
{{- $quoted = append $quoted (printf "'%s'" (replace "'" "'\\''" $a)) -}}
{{- end -}}
{{- end -}}
{{- join " " $quoted -}}
{{- end -}}

{{/* Ray's per-node health endpoint (dashboard agent), served by Ray >= 2.53: 200 when the raylet
     (and on the head the GCS) is healthy, else 503. The probes below use it through httpGet, so
     KubeRay injects none of its own: KubeRay 1.1-1.5 inject `wget` exec probes, and the CUDA image
     has no wget (pods would never become Ready). */}}
{{- define "quantcore.rayProbes" -}}
readinessProbe:
  httpGet:
    path: /api/healthz
    port: 52365
  initialDelaySeconds: 10
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 10
livenessProbe:
  httpGet:
    path: /api/healthz
    port: 52365
  initialDelaySeconds: 30
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 120
{{- end -}}

{{/* object-store-memory (bytes) of a Ray node group, checked against its shared memory: Ray puts
     the object store into /dev/shm only if it fits there (otherwise onto disk under /tmp, or it
     refuses to start above 10 GB), and the in-memory /dev/shm counts against the container's memory
     limit. Ray's default (30% of the memory limit) is larger than the shm sizes used here, hence an
     explicit size. ctx: dict g (head / workers block), where (its values path) */}}
{{- define "quantcore.rayObjectStore" -}}
{{- $mem := dig "limits" "memory" "" (default (dict) .g.resources) -}}
{{- if not $mem -}}
{{- fail (printf "%s.resources.limits.memory is required: Ray sizes its memory from it" .where) -}}
{{- end -}}
{{- $memB := int64 (include "quantcore.bytes" (dict "q" $mem "where" (printf "%s.resources.limits.memory" .where))) -}}
{{- $shmB := int64 (include "quantcore.bytes" (dict "q" .g.shmSize "where" (printf "%s.shmSize" .where))) -}}
{{- $osB := int64 (include "quantcore.bytes" (dict "q" .g.objectStoreMemory "where" (printf "%s.objectStoreMemory" .where))) -}}
{{- if lt $osB 78643200 -}}
{{- fail (printf "%s.objectStoreMemory (%s) is below Ray's minimum object store of 75Mi" .where .g.objectStoreMemory) -}}
{{- end -}}
{{- if gt $osB $shmB -}}
{{- fail (printf "%s.objectStoreMemory (%s) exceeds %s.shmSize (%s): the object store must fit into /dev/shm (Ray would put it on disk, or refuse to start)" .where .g.objectStoreMemory .where .g.shmSize) -}}
{{- end -}}
{{- if ge $shmB $memB -}}
{{- fail (printf "%s.shmSize (%s) must be below %s.resources.limits.memory (%v): /dev/shm is memory of the container" .where .g.shmSize .where $mem) -}}
{{- end -}}
{{- $osB -}}
{{- end -}}

{{/* A KubeRay RayJob (ray.io/v1) on a throw-away Ray cluster: a submitter pod runs `ray job submit`
     with the entrypoint, the driver runs on the head (no CPUs/GPUs advertised, so work lands on the
     workers), the workers do the work, and the cluster is deleted when the job finishes.
     Queueing: queueName (Kueue) labels the RayJob and creates it suspended (Kueue admits head,
     workers and submitter together); volcanoQueue labels it for KubeRay's Volcano integration (the
     operator runs with --batch-scheduler=volcano and puts head and workers into one PodGroup).
     ctx: dict
       root        the chart root context
       cfg         the values block (.Values.sweep / .Values.rayQat)
       valuesKey   its name in the values ("sweep", "rayQat"), for error messages
       component   app.kubernetes.io/component of the RayJob ("sweep", "ray-qat"); pods get -submitter/-head/-worker
       entrypoint  the entrypoint as a list of arguments
       headMounts  extra volumeMounts of the head container (YAML list text, may be "")
       headVolumes extra volumes of the head pod (YAML list text, may be "") */}}
{{- define "quantcore.rayJob" -}}
{{- $root := .root -}}
{{- $cfg := .cfg -}}
{{- $key := .valuesKey -}}
{{- $w := $cfg.workers -}}
{{- /* No Ray autoscaler (enableInTreeAutoscaling: false, which Kueue needs to admit a RayJob), so
       KubeRay starts exactly `replicas` workers: other bounds would be ignored, hence refused. */ -}}
{{- range $bound := list "minReplicas" "maxReplicas" }}
{{- if and (hasKey $w $bound) (ne (int (get $w $bound)) (int $w.replicas)) }}
{{- fail (printf "%s.workers.%s (%d) differs from %s.workers.replicas (%d): the chart runs Ray without its autoscaler (enableInTreeAutoscaling: false), so KubeRay starts exactly `replicas` workers and never scales. Set replicas to the number of workers you want and remove minReplicas/maxReplicas" $key $bound (int (get $w $bound)) $key (int $w.replicas)) }}
{{- end }}
{{- end }}
{{- if semverCompare "<2.53.0" $cfg.rayVersion }}
{{- fail (printf "%s.rayVersion %s: the Ray pods' health probes need Ray >= 2.53 (/api/healthz); rayVersion must equal the ray in the image" $key $cfg.rayVersion) }}
{{- end }}
{{- include "quantcore.checkQueues" (dict "queueName" $cfg.queueName "volcanoQueue" $cfg.volcanoQueue "where" $key) }}
{{- if and $cfg.queueName (not $cfg.shutdownAfterJobFinishes) }}
{{- fail (printf "%s.queueName needs %s.shutdownAfterJobFinishes: true (Kueue does not admit a RayJob whose cluster outlives the job)" $key $key) }}
{{- end }}
{{- $headStore := include "quantcore.rayObjectStore" (dict "g" $cfg.head "where" (printf "%s.head" $key)) }}
{{- $workerStore := include "quantcore.rayObjectStore" (dict "g" $w "where" (printf "%s.workers" $key)) }}
{{- range $g := list "head" "workers" }}
{{- $gv := get $cfg $g }}
{{- include "quantcore.checkPodStorage" (dict "resources" $gv.resources "where" (printf "%s.%s.resources" $key $g) "disk" (list (dict "name" (printf "%s.%s.tmpSize" $key $g) "size" $gv.tmpSize) (dict "name" (printf "%s.%s.cacheSize" $key $g) "size" $gv.cacheSize)) "shm" nil) }}
{{- end }}
{{- if eq $cfg.submissionMode "K8sJobMode" }}
{{- include "quantcore.checkPodStorage" (dict "resources" $cfg.submitter.resources "where" (printf "%s.submitter.resources" $key) "disk" (list (dict "name" "the submitter's /tmp" "size" "1Gi")) "shm" nil) }}
{{- end }}
{{- $pvcs := concat (default (list) $root.Values.volumes) (default (list) $cfg.volumes) }}
{{- $s3env := include "quantcore.s3Env" $root }}
{{- $labels := deepCopy (default (dict) $cfg.labels) }}
{{- with $cfg.queueName }}{{ $_ := set $labels "kueue.x-k8s.io/queue-name" . }}{{ end }}
{{- with $cfg.volcanoQueue }}
{{- $_ := set $labels "ray.io/scheduler-name" "volcano" }}
{{- $_ := set $labels "volcano.sh/queue-name" . }}
{{- with $cfg.priorityClassName }}{{ $_ := set $labels "ray.io/priority-class-name" . }}{{ end }}
{{- end }}
{{- $pod := dict "root" $root "labels" $cfg.labels "annotations" $cfg.podAnnotations "where" (printf "%s.labels" $key) }}
apiVersion: ray.io/v1
kind: RayJob
metadata:
  name: {{ include "quantcore.rayJobName" (dict "root" $root "name" $cfg.name) }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "quantcore.labelsFor" (dict "root" $root "component" .component "run" "" "extra" $labels "where" (printf "%s.labels" $key)) | nindent 4 }}
spec:
  {{- /* The entrypoint passes two shells in K8sJobMode: KubeRay's submitter (bash -c, which takes the
         quoting off) and Ray's job supervisor (shell=True, after `ray job submit` re-quoted only words with
         blanks); $(VAR) is expanded by Kubernetes too. No quoting survives all three, so only characters
         none of them interprets are let through. */}}
  {{- range .entrypoint }}{{ $a := toString . }}{{ if not (regexMatch "^[A-Za-z0-9_./:=@%+, -]*$" $a) }}{{ fail (printf "%s: %q in a RayJob entrypoint argument has characters a shell interprets: KubeRay's submitter runs the entrypoint through bash and Ray's job supervisor through a second shell, so $VAR, $(VAR), backquotes, quotes, ;, &, |, <, >, *, ? and the like would be expanded or split (a run writing under another prefix), and Kubernetes expands $(VAR) from the submitter's environment, the S3 secret included. Use a URI/value of letters, digits, blanks and _ . / : = @ %% + , -" $key $a) }}{{ end }}{{ end }}
  entrypoint: {{ include "quantcore.shellJoin" .entrypoint | quote }}
  submissionMode: {{ $cfg.submissionMode }}
  shutdownAfterJobFinishes: {{ $cfg.shutdownAfterJobFinishes }}
  {{- /* KubeRay refuses a TTL on a RayJob whose cluster is kept (shutdownAfterJobFinishes false): the
         default (60) becomes 0 there, another value is an error */}}
  {{- if and (ne (toString $cfg.shutdownAfterJobFinishes) "true") (not (has (int $cfg.ttlSecondsAfterFinished) (list 0 60))) }}{{ fail (printf "%s.ttlSecondsAfterFinished %d with %s.shutdownAfterJobFinishes false: the cluster is kept, so there is nothing to delete after a TTL (KubeRay refuses one); remove it, or set shutdownAfterJobFinishes: true" $key (int $cfg.ttlSecondsAfterFinished) $key) }}{{ end }}
  ttlSecondsAfterFinished: {{ ternary (int $cfg.ttlSecondsAfterFinished) 0 (eq (toString $cfg.shutdownAfterJobFinishes) "true") }}
  activeDeadlineSeconds: {{ int $cfg.activeDeadlineSeconds }}
  backoffLimit: {{ int $cfg.backoffLimit }}
  {{- if $cfg.queueName }}
  # Kueue unsuspends the RayJob when it admits head, workers and submitter together.
  suspend: true
  {{- end }}
  {{- if eq $cfg.submissionMode "K8sJobMode" }}
  submitterPodTemplate:
    metadata:
      {{- include "quantcore.podMetadata" (merge (dict "component" (printf "%s-submitter" .component) "run" "") $pod) | nindent 6 }}
    spec:
      serviceAccountName: {{ include "quantcore.serviceAccountName" $root }}
      automountServiceAccountToken: false
      restartPolicy: Never
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "quantcore.podSecurityContext" $root | nindent 8 }}
      {{- with $cfg.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      containers:
        - name: ray-job-submitter
          image: {{ include "quantcore.image" $root }}
          imagePullPolicy: {{ include "quantcore.pullPolicy" $root }}
          resources:
            {{- toYaml $cfg.submitter.resources | nindent 12 }}
          securityContext:
            {{- include "quantcore.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 1Gi
  {{- end }}
  rayClusterSpec:
    rayVersion: {{ $cfg.rayVersion | quote }}
    enableInTreeAutoscaling: false
    headGroupSpec:
      # The head runs the driver only: no CPUs/GPUs advertised, so the work lands on the workers.
      rayStartParams:
        dashboard-host: "0.0.0.0"
        num-cpus: "0"
        num-gpus: "0"
        object-store-memory: {{ $headStore | quote }}
        metrics-export-port: "8080"
      template:
        metadata:
          {{- include "quantcore.podMetadata" (merge (dict "component" (printf "%s-head" .component) "run" "") $pod) | nindent 10 }}
        spec:
          serviceAccountName: {{ include "quantcore.serviceAccountName" $root }}
          automountServiceAccountToken: false
          enableServiceLinks: false
          {{- with $root.Values.imagePullSecrets }}
          imagePullSecrets:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            {{- include "quantcore.podSecurityContext" $root | nindent 12 }}
          {{- include "quantcore.scheduling" (dict "root" $root "gpus" 0 "nodeSelector" $cfg.head.nodeSelector "tolerations" $cfg.head.tolerations "affinity" $cfg.head.affinity "priorityClassName" $cfg.priorityClassName) | nindent 10 }}
          containers:
            - name: ray-head
              image: {{ include "quantcore.image" $root }}
              imagePullPolicy: {{ include "quantcore.pullPolicy" $root }}
              ports:
                - name: gcs-server
                  containerPort: 6379
                - name: dashboard
                  containerPort: 8265
                - name: client
                  containerPort: 10001
                - name: metrics
                  containerPort: 8080
              {{- include "quantcore.rayProbes" . | nindent 14 }}
              {{- if $s3env }}
              env:
                {{- $s3env | nindent 16 }}
              {{- end }}
              resources:
                {{- toYaml $cfg.head.resources | nindent 16 }}
              securityContext:
                {{- include "quantcore.containerSecurityContext" $root | nindent 16 }}
              volumeMounts:
                {{- include "quantcore.scratchMounts" (dict "root" $root "pvcs" $pvcs) | nindent 16 }}
                {{- with .headMounts }}
                {{- . | nindent 16 }}
                {{- end }}
          volumes:
            {{- include "quantcore.scratchVolumes" (dict "root" $root "tmpSize" $cfg.head.tmpSize "cacheSize" $cfg.head.cacheSize "shmSize" $cfg.head.shmSize "pvcs" $pvcs) | nindent 12 }}
            {{- with .headVolumes }}
            {{- . | nindent 12 }}
            {{- end }}
    workerGroupSpecs:
      - groupName: {{ $w.groupName }}
        replicas: {{ int $w.replicas }}
        minReplicas: {{ int $w.replicas }}
        maxReplicas: {{ int $w.replicas }}
        # KubeRay derives num-cpus / num-gpus / memory from the container limits.
        rayStartParams:
          object-store-memory: {{ $workerStore | quote }}
          metrics-export-port: "8080"
        template:
          metadata:
            {{- include "quantcore.podMetadata" (merge (dict "component" (printf "%s-worker" .component) "run" "") $pod) | nindent 12 }}
          spec:
            serviceAccountName: {{ include "quantcore.serviceAccountName" $root }}
            automountServiceAccountToken: false
            enableServiceLinks: false
            {{- with $root.Values.imagePullSecrets }}
            imagePullSecrets:
              {{- toYaml . | nindent 14 }}
            {{- end }}
            securityContext:
              {{- include "quantcore.podSecurityContext" $root | nindent 14 }}
            {{- include "quantcore.scheduling" (dict "root" $root "gpus" $w.gpus "nodeSelector" $w.nodeSelector "tolerations" $w.tolerations "affinity" $w.affinity "priorityClassName" $cfg.priorityClassName) | nindent 12 }}
            containers:
              - name: ray-worker
                image: {{ include "quantcore.image" $root }}
                imagePullPolicy: {{ include "quantcore.pullPolicy" $root }}
                ports:
                  - name: metrics
                    containerPort: 8080
                {{- include "quantcore.rayProbes" . | nindent 16 }}
                {{- if $s3env }}
                env:
                  {{- $s3env | nindent 18 }}
                {{- end }}
                resources:
                  {{- include "quantcore.resources" (dict "resources" $w.resources "gpus" $w.gpus "gpuName" $root.Values.gpu.resourceName) | nindent 18 }}
                securityContext:
                  {{- include "quantcore.containerSecurityContext" $root | nindent 18 }}
                volumeMounts:
                  {{- include "quantcore.scratchMounts" (dict "root" $root "pvcs" $pvcs) | nindent 18 }}
            volumes:
              {{- include "quantcore.scratchVolumes" (dict "root" $root "tmpSize" $w.tmpSize "cacheSize" $w.cacheSize "shmSize" $w.shmSize "pvcs" $pvcs) | nindent 14 }}
{{- end -}}
