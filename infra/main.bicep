// vmss-healer on Azure: the Function App (Flex Consumption, Linux, custom handler, system-assigned
// identity), its storage (tables and the host's own, reached by identity, shared keys off),
// monitoring (Application Insights, with the alert rules and the workbook of monitoring.bicep),
// the heartbeat topic (no local auth), Resource Manager system topics for the watched resource
// groups, a Key Vault for the webhook URL, and least-privilege role assignments.
//
// Event subscriptions need the deployed `monitor-events` function, so they are a second deployment
// (`subscriptions.bicep`) that `azd` runs after the code is deployed (azure.yaml, postdeploy).
// Not compiled on the project's machines (no Bicep CLI there): `tests/infra.rs` checks the settings
// and role actions against the code; `az bicep build --file infra/main.bicep` checks the rest.
targetScope = 'resourceGroup'

@description('Short prefix for resource names (letters and digits).')
@minLength(3)
@maxLength(11)
param name string = 'vmsshealer'

param location string = resourceGroup().location

@description('The scale sets to watch: [{ id: \'/subscriptions/…/virtualMachineScaleSets/web\', overrides: \'REPAIR_ACTIONS=restart,replace\' }]. Same subscription as this deployment.')
param watchedScaleSets array

@description('Resource Manager system topics that already exist, by watched resource group (lower case): { "rg-web": "rg-web-events" }. Azure allows one system topic per resource group: a group that has one (made from the portal\'s Events blade, say) must reuse it. Find it with `az eventgrid system-topic list --query "[?source==\'/subscriptions/<sub>/resourceGroups/<rg>\'].name"`.')
param existingSystemTopics object = {}

@description('Principal ids of the scale sets\' managed identities: they get EventGrid Data Sender on the heartbeat topic.')
param senderPrincipalIds array = []

@description('Webhook for alerts (repair, give-up, pause, resume); kept in Key Vault. Empty: no alerts.')
@secure()
param webhookUrl string = ''

@description('Start in dry run: decide and journal, act on nothing. Turn off once the journal reads right.')
param dryRun bool = true

@description('Repair policy, see the README settings table.')
param repairActions string = 'replace'
param maxParallel string = '10%'
param maxUnhealthy string = '40%'
param downProof string = 'vmid'

@description('PEM of the CAs issuing IMDS\'s metadata.azure.com certificate; needed for downProof = attested.')
param attestationCaPem string = ''

@description('Where the alert rules of infra/monitoring.bicep e-mail (give-ups, a brake held too long, a failing mirror). Empty: they fire in the portal only.')
param alertEmail string = ''

@description('Alert when a scale set\'s repairs have been paused longer than this many minutes.')
param brakeAlertMinutes int = 30

@description('Whether `handler swap` (blue/green between two watched scale sets) may be used: grants the capacity write on the scale sets and the reading, writing and deleting of autoscale settings on their resource groups.')
param enableSwap bool = false

@description('Whether `handler prototype` (golden images from a known-good instance) may be used: grants the capacity and model write on the scale sets, and Run Command, deallocate, snapshots and the gallery on their resource groups.')
param enablePrototype bool = false

var suffix = uniqueString(resourceGroup().id, name)
var storageName = toLower(take('${name}${suffix}', 24))
var scaleSetIds = map(watchedScaleSets, s => s.id)
var healerScaleSets = join(
  map(watchedScaleSets, s => empty(s.?overrides ?? '') ? s.id : '${s.id}[${s.overrides}]'),
  ' '
)
// Whether any repair may replace: only then does the identity get virtualMachineScaleSets/write.
var canResize = contains(toLower(repairActions), 'replace') || length(filter(watchedScaleSets, s => contains(toLower(s.?overrides ?? ''), 'replace'))) > 0 || enableSwap || enablePrototype
// Resource groups of the stateful scale sets (a STATEFUL_ override): the disk mover's role there.
var statefulResourceGroups = union(map(filter(watchedScaleSets, s => contains(toUpper(s.?overrides ?? ''), 'STATEFUL_')), s => toLower(split(s.id, '/')[4])), [])
// Resource groups of the watched scale sets (index 4 of an ARM id), each once: lower case, as
// groups whose names differ only in case are one group.
var watchedResourceGroups = union(map(scaleSetIds, id => toLower(split(id, '/')[4])), [])

// ---- monitoring ----
resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${name}-logs-${suffix}'
  location: location
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: 30
  }
}

resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: '${name}-ai-${suffix}'
  location: location
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logs.id
    DisableLocalAuth: true
  }
}

// ---- storage: the healer's tables and the host's own blobs, identity only ----
resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageName
  location: location
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
  properties: {
    allowSharedKeyAccess: false
    allowBlobPublicAccess: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    defaultToOAuthAuthentication: true
  }
}

resource blobs 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource deployments 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobs
  name: 'deployments'
}

resource deadLetters 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobs
  name: 'deadletters'
}

// ---- Key Vault: the webhook URL ----
resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: take('${name}kv${suffix}', 24)
  location: location
  properties: {
    tenantId: subscription().tenantId
    sku: { family: 'A', name: 'standard' }
    enableRbacAuthorization: true
    // Soft delete without purge protection: the vault holds one webhook URL (rotate it at its
    // source if it leaks), and purge protection would keep its name (fixed per resource group
    // and `name`) unusable for 90 days after `azd down`, with no way to free it. Without it,
    // `azd down --purge` or `az keyvault purge` frees the name at once. The property is left
    // out rather than false (a vault that has it on cannot have it turned off), and so is the
    // retention, which cannot change once a vault exists.
    enableSoftDelete: true
  }
}

resource webhookSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(webhookUrl)) {
  parent: vault
  name: 'webhook-url'
  properties: { value: webhookUrl }
}

// ---- the Function App ----
resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: '${name}-plan-${suffix}'
  location: location
  kind: 'functionapp'
  sku: { name: 'FC1', tier: 'FlexConsumption' }
  properties: { reserved: true }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  name: '${name}-${suffix}'
  location: location
  // azd deploys the `healer` service of azure.yaml here.
  tags: { 'azd-service-name': 'healer' }
  kind: 'functionapp,linux'
  identity: { type: 'SystemAssigned' }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    siteConfig: {
      minTlsVersion: '1.2'
      appSettings: [
        // The host's own storage, by identity.
        { name: 'AzureWebJobsStorage__accountName', value: storage.name }
        { name: 'APPLICATIONINSIGHTS_CONNECTION_STRING', value: insights.properties.ConnectionString }
        { name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING', value: 'Authorization=AAD' }
        // vmss-healer (README, Settings). Empty values mean "the default".
        { name: 'HEALER_SCALE_SETS', value: healerScaleSets }
        { name: 'HEALER_STORAGE__tableServiceUri', value: storage.properties.primaryEndpoints.table }
        { name: 'HEALER_ARM_ENDPOINT', value: environment().resourceManager }
        { name: 'HEALER_HEARTBEAT_TIMEOUT', value: '180' }
        { name: 'HEALER_STARTUP_TIMEOUT', value: '600' }
        { name: 'HEALER_GRACE_PERIOD', value: '300' }
        { name: 'HEALER_DOWN_FOR', value: '60' }
        { name: 'HEALER_REPAIR_ACTIONS', value: repairActions }
        { name: 'HEALER_REPAIR_TIMEOUT', value: '900' }
        { name: 'HEALER_MAX_ATTEMPTS', value: '3' }
        { name: 'HEALER_MAX_PARALLEL', value: maxParallel }
        { name: 'HEALER_MAX_UNHEALTHY', value: maxUnhealthy }
        { name: 'HEALER_PLATFORM_REPAIRS', value: 'defer' }
        { name: 'HEALER_DOWN_PROOF', value: downProof }
        { name: 'HEALER_MAX_MAINTENANCE', value: '4h' }
        { name: 'HEALER_EVENT_REPAIRS', value: 'true' }
        { name: 'HEALER_ATTESTATION_CA', value: attestationCaPem }
        { name: 'HEALER_MIRROR_MAX_AGE', value: '300' }
        { name: 'HEALER_FULL_RESYNC', value: '600' }
        { name: 'HEALER_JOURNAL_DAYS', value: '90' }
        // Within host.json's functionTimeout (5 min): deadline + one call + 30 s of final writes.
        { name: 'HEALER_PASS_DEADLINE', value: '150' }
        { name: 'HEALER_CALL_TIMEOUT', value: '30' }
        { name: 'HEALER_DRY_RUN', value: string(dryRun) }
        {
          name: 'HEALER_WEBHOOK_URL'
          value: empty(webhookUrl) ? '' : '@Microsoft.KeyVault(SecretUri=${webhookSecret.properties.secretUri})'
        }
        // Half a minute apart: each repair pass reads a mirror at most 30 s old, and the two
        // passes never compete for storage.
        { name: 'HEALER_STATUS_SCHEDULE', value: '0 */1 * * * *' }
        { name: 'HEALER_STATE_SCHEDULE', value: '30 */1 * * * *' }
      ]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deployments.name}'
          authentication: { type: 'SystemAssignedIdentity' }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: 40
        instanceMemoryMB: 512
      }
      runtime: { name: 'custom', version: '1.0' }
    }
  }
}

// ---- the heartbeat topic: Entra auth only ----
resource topic 'Microsoft.EventGrid/topics@2022-06-15' = {
  name: '${name}-heartbeats-${suffix}'
  location: location
  identity: { type: 'SystemAssigned' }
  properties: {
    inputSchema: 'EventGridSchema'
    disableLocalAuth: true
    publicNetworkAccess: 'Enabled'
  }
}

// ---- role assignments (built-in role ids) ----
var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
  eventGridDataSender: 'd5a91429-5739-47e2-a06b-3470a27159e7'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

// The app: the host's blobs and queues, the healer's tables, the webhook secret, telemetry.
var appStorageRoles = [roles.storageBlobDataOwner, roles.storageQueueDataContributor, roles.storageTableDataContributor]
resource appStorage 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for role in appStorageRoles: {
  scope: storage
  name: guid(storage.id, app.id, role)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
    principalId: app.identity.principalId
    principalType: 'ServicePrincipal'
  }
}]

resource appSecrets 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: vault
  name: guid(vault.id, app.id, roles.keyVaultSecretsUser)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
    principalId: app.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource appTelemetry 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: insights
  name: guid(insights.id, app.id, roles.monitoringMetricsPublisher)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: app.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// The topic dead-letters undeliverable heartbeats into blob storage with its own identity.
resource topicDeadLetters 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  scope: storage
  name: guid(storage.id, topic.id, roles.storageBlobDataContributor)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    principalId: topic.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

// The VMs publish heartbeats with their managed identities.
resource senders 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principal in senderPrincipalIds: {
  scope: topic
  name: guid(topic.id, principal, roles.eventGridDataSender)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.eventGridDataSender)
    principalId: principal
    principalType: 'ServicePrincipal'
  }
}]

// Exactly the Compute actions the handler performs (src/edges/compute.rs REQUIRED_ACTIONS), on each
// watched scale set and nothing else.
module computeRole 'modules/compute-role.bicep' = {
  name: 'healer-compute-role'
  scope: subscription()
  // The capacity write only where a replace can be configured, globally or for one scale set.
  params: { name: name, canResize: canResize }
}

module scaleSetAccess 'modules/scaleset-access.bicep' = [for id in scaleSetIds: {
  name: 'healer-access-${uniqueString(id)}'
  scope: resourceGroup(split(id, '/')[4])
  params: {
    scaleSetName: split(id, '/')[8]
    roleDefinitionId: computeRole.outputs.roleDefinitionId
    flexibleVmRoleId: computeRole.outputs.flexibleVmRoleId
    principalId: app.identity.principalId
  }
}]

// Reading how our repairs' operations ended needs a role at the resource group (see
// modules/compute-role.bicep); it holds that one action and nothing else.
module operationAccess 'modules/operation-access.bicep' = [for rg in watchedResourceGroups: {
  // Deployment and topic names from a hash: a group name may be 90 characters with `_ . ( )`,
  // which neither allows.
  name: 'healer-operations-${uniqueString(rg)}'
  scope: resourceGroup(rg)
  params: {
    roleDefinitionId: computeRole.outputs.operationReaderRoleId
    principalId: app.identity.principalId
  }
}]

// A swap moves autoscale settings, resources of the watched groups: the role only with enableSwap.
module autoscaleAccess 'modules/operation-access.bicep' = [for rg in watchedResourceGroups: if (enableSwap) {
  name: 'healer-autoscale-${uniqueString(rg)}'
  scope: resourceGroup(rg)
  params: {
    roleDefinitionId: computeRole.outputs.autoscaleRoleId
    principalId: app.identity.principalId
  }
}]

// A golden image's snapshot, gallery and instance actions, on the watched groups, only with
// enablePrototype.
module prototypeAccess 'modules/operation-access.bicep' = [for rg in watchedResourceGroups: if (enablePrototype) {
  name: 'healer-prototype-${uniqueString(rg)}'
  scope: resourceGroup(rg)
  params: {
    roleDefinitionId: computeRole.outputs.prototypeRoleId
    principalId: app.identity.principalId
  }
}]

// A stateful replacement's disks, on the groups of the stateful scale sets only.
module statefulAccess 'modules/operation-access.bicep' = [for rg in statefulResourceGroups: {
  name: 'healer-stateful-${uniqueString(rg)}'
  scope: resourceGroup(rg)
  params: {
    roleDefinitionId: computeRole.outputs.statefulRoleId
    principalId: app.identity.principalId
  }
}]

// Resource Manager events of each watched resource group: its system topic, unless it has one.
module rmEvents 'modules/rm-events.bicep' = [for rg in watchedResourceGroups: if (!contains(existingSystemTopics, rg)) {
  name: 'healer-rm-events-${uniqueString(rg)}'
  scope: resourceGroup(rg)
  params: { name: '${name}-rm-${uniqueString(rg)}' }
}]

// azd stores these as environment values; infra/hooks/postdeploy.sh passes them on.
// Alert rules and the fleet workbook, on what the handler exports (src/edges/telemetry.rs).
module monitoring 'monitoring.bicep' = {
  name: 'monitoring'
  params: {
    name: name
    location: location
    insightsId: insights.id
    alertEmail: alertEmail
    brakeAlertMinutes: brakeAlertMinutes
  }
}

output FUNCTION_APP_NAME string = app.name
output HEARTBEAT_TOPIC_ENDPOINT string = topic.properties.endpoint
output HEARTBEAT_TOPIC_NAME string = topic.name
output STORAGE_ACCOUNT_NAME string = storage.name
// ARM evaluates only the branch `if` takes: an existing topic's group never reads the module.
output SYSTEM_TOPICS array = [for (rg, i) in watchedResourceGroups: {
  resourceGroup: rg
  name: contains(existingSystemTopics, rg) ? existingSystemTopics[rg] : rmEvents[i].outputs.systemTopicName
}]
