// The event subscriptions that feed monitor-events: heartbeats from the custom topic, and the
// Compute scale-set operations from each watched resource group's system topic. Deployed after
// the code (Event Grid validates that the function exists); azd runs it as a postdeploy hook.
targetScope = 'resourceGroup'

param functionAppName string
param heartbeatTopicName string
param storageAccountName string
@description('[{ resourceGroup, name }] as main.bicep outputs them.')
param systemTopics array

resource app 'Microsoft.Web/sites@2024-04-01' existing = {
  name: functionAppName
}

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource topic 'Microsoft.EventGrid/topics@2022-06-15' existing = {
  name: heartbeatTopicName
}

var destination = {
  endpointType: 'AzureFunction'
  properties: {
    resourceId: '${app.id}/functions/monitor-events'
    maxEventsPerBatch: 1
  }
}

// Heartbeats are worth little after a few minutes; retry briefly, then dead-letter for the record.
resource heartbeats 'Microsoft.EventGrid/topics/eventSubscriptions@2022-06-15' = {
  parent: topic
  name: 'monitor-events'
  properties: {
    destination: destination
    eventDeliverySchema: 'EventGridSchema'
    filter: { includedEventTypes: ['VmssHealer.Heartbeat', 'prunella-status'] }
    retryPolicy: { maxDeliveryAttempts: 10, eventTimeToLiveInMinutes: 30 }
    deadLetterWithResourceIdentity: {
      identity: { type: 'SystemAssigned' }
      deadLetterDestination: {
        endpointType: 'StorageBlob'
        properties: { resourceId: storage.id, blobContainerName: 'deadletters' }
      }
    }
  }
}

module rmSubscriptions 'modules/rm-subscription.bicep' = [for t in systemTopics: {
  name: 'healer-rm-sub-${uniqueString(t.resourceGroup)}'
  scope: resourceGroup(t.resourceGroup)
  params: {
    systemTopicName: t.name
    destination: destination
  }
}]
